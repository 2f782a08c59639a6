from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config, study_keys, training_keys
from pipeline.errors import UserError

from helpers import REPO, run_cli


def test_repo_params_are_valid_and_equal_the_code_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.name == "digits" and cfg.comparison == ["logreg", "mlp", "cnn"]
    assert cfg.tune.space, "the default pipeline searches something"
    # params.yaml spells out every value the code defaults to: a default changed in one place only fails here
    spelled, defaults = cfg.model_dump(), Config().model_dump()
    spelled["tune"].pop("space"), defaults["tune"].pop("space")
    assert spelled == defaults


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "--set train.lrr: unknown key 'train.lrr'"),
    ("train.lr=-1", "--set train.lr: train.lr: Input should be greater than 0"),
    ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
    ("train.epochs=ten", "train.epochs: Input should be a valid integer"),
    ("train.optimizer=adagrad", "train.optimizer: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
    ("train.scheduler=linear", "train.scheduler:"),
    ("model.name=vgg", "model.name:"),
    ("data.name=imagenet", "data.name:"),
    ("comparison=[mlp, vgg]", "comparison[1]:"),
    ("comparison=[mlp, cnn, mlp]", "comparison: lists mlp more than once"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("seed=4294967296", "seed: Input should be less than 4294967296"),
    ("train.device=gpu", "train.device: must be auto, cpu, cuda, cuda:N or mps"),
    ("tune.space={train.batch_size: {low: 0, high: 3}}",
     "--set tune.space: tune.space.train.batch_size: 0 is not a valid"),
    ("tune.space={train.optimizer: {choices: [adam, foo]}}", "tune.space.train.optimizer: 'foo' is not a valid"),
    ("tune.space={train.lrr: {low: 0.1, high: 1}}", "tune.space: 'train.lrr' is not a searchable param"),
    ("tune.space={seed: {low: 1, high: 9}}", "tune.space: 'seed' is not a searchable param"),
    ("tune.space={train.lr: {low: 0.1, high: 0.01}}", "tune.space.train.lr: low (0.1) must be below high (0.01)"),
    ("tune.space={train.lr: {low: 0, high: 1, log: true}}", "a log range needs low > 0"),
    ("tune.pruner=asha", "tune.pruner:"),
    ("train.lr.x=1", "cannot set train.lr.x: train.lr is not a section"),
    ("train.lr=[1", "--set train.lr: not valid YAML"),
    ("tune.epochs=null", "tune.epochs: Input should be a valid integer"),
])
def test_bad_params_name_the_key_and_where_it_was_set(override, message):
    with pytest.raises(UserError) as err:
        load_config(REPO / "params.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {lr: -1}\n")
    with pytest.raises(UserError, match=r"^.*params.yaml: train.lr: Input should be greater than 0 \(got -1\)$"):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize("text, message", [
    ("train: {lr: 0.1}\ntrain: {epochs: 2}\n", "duplicate key 'train'"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key 'lr'"),
    ("a: &x [1, 2]\nb: *x\n", "aliases (*name) are not supported"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
])
def test_params_yaml_shapes_that_are_refused(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(UserError) as err:
        load_config(tmp_path / "params.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overrides_parse_yaml_values():
    cfg = load_config(REPO / "params.yaml", ["train.lr=1e-3", "train.nesterov=true", "comparison=[cnn]"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.nesterov is True and cfg.comparison == ["cnn"]


def test_fingerprint_follows_exactly_the_training_keys():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.fingerprint() == load_config(REPO / "params.yaml").fingerprint()
    for key, value in {"train.lr": 0.5, "seed": 1, "data.augment.crop_padding": 2, "model.dropout": 0.1}.items():
        assert cfg.fingerprint() != cfg.with_overrides({key: value}).fingerprint(), key
    for key, value in {"train.resume": False, "tune.n_trials": 3, "tracking.enabled": False, "data.test_fraction": 0.3}.items():
        assert cfg.fingerprint() == cfg.with_overrides({key: value}).fingerprint(), key


def test_key_lists_name_real_params_and_leave_out_what_the_search_sets():
    known = set(Config().flat()) | {"data.augment", "tune.space"}
    assert set(training_keys()) <= known and set(study_keys()) <= known
    assert {"train.epochs", "train.monitor", "train.resume", "tune.n_trials", "tune.storage"}.isdisjoint(study_keys())
    assert {"tune.epochs", "tune.space", "model.name"} <= set(study_keys())


def test_public_config_masks_passwords():
    cfg = load_config(REPO / "params.yaml", ["tune.storage=postgresql://bob:s3cret@db:5432/optuna",
                                             "tracking.uri=http://alice:hunter2@mlflow:5000"])
    shown = str(cfg.public())
    assert "s3cret" not in shown and "hunter2" not in shown and "bob:***@db" in shown
    assert cfg.tune.storage.endswith("s3cret@db:5432/optuna")  # the real value still works


def test_cli_reports_bad_param_in_one_line_with_exit_2(tmp_path: Path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("prepare", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: train.lr: Input should be greater than 0 (got -1)"]
    assert not (tmp_path / "data").exists(), "a rejected config must not write outputs"


def test_the_params_reference_page_is_what_the_config_says():
    """docs/params.md is generated from the config's fields (type, default, bounds, description): an edit to a
    field's description without `python scripts/params_reference.py` leaves it stale, and this fails."""
    import subprocess
    import sys

    from helpers import REPO

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "params_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_command_lines_model_counts_before_validation():
    """`train --model resnet18 --set model.weights=IMAGENET1K_V1` was refused with "cnn has no published weights":
    params.yaml's model was judged, not the one the command line asked for."""
    from helpers import REPO
    from pipeline.config import load_config

    cfg = load_config(REPO / "params.yaml", ["model.weights=IMAGENET1K_V1"], model="resnet18")
    assert (cfg.model.name, cfg.model.weights) == ("resnet18", "IMAGENET1K_V1")
    plain = load_config(REPO / "params.yaml", [], model="logreg")  # a comparison model trains from scratch
    assert (plain.model.name, plain.model.weights) == ("logreg", None)
    with pytest.raises(UserError, match="--model: model.name"):
        load_config(REPO / "params.yaml", [], model="alexnet")
