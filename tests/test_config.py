from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.errors import UserError

from conftest import REPO, run_cli


def test_repo_params_are_valid_and_match_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.name == "digits"
    assert cfg.models == ["logreg", "mlp", "cnn"]
    # params.yaml spells out every key, so a typo in the code's defaults cannot hide
    def spelled(c):
        return {key for key in c.flat() if not key.startswith("tune.space")}

    assert spelled(cfg) == spelled(Config())
    assert cfg.tune.space, "the default pipeline searches something"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "unknown key 'train.lrr'"),
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
    ("train.epochs=ten", "train.epochs: Input should be a valid integer"),
    ("train.optimizer=adagrad", "train.optimizer: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
    ("train.scheduler=linear", "train.scheduler:"),
    ("model.name=vgg", "model.name:"),
    ("data.name=imagenet", "data.name:"),
    ("models=[mlp, vgg]", "models[1]:"),
    ("train.device=gpu", "train.device: must be auto, cpu, cuda, cuda:N or mps"),
    ("tune.space={train.epochs: {low: 0, high: 3}}", "params.yaml: tune.space.train.epochs: 0 is not a valid value"),
    ("tune.space={train.optimizer: {choices: [adam, foo]}}", "tune.space.train.optimizer: 'foo' is not a valid"),
    ("tune.space={train.lrr: {low: 0.1, high: 1}}", "tune.space: 'train.lrr' is not a searchable param"),
    ("tune.space={seed: {low: 1, high: 9}}", "tune.space: 'seed' is not a searchable param"),
    ("tune.space={train.lr: {low: 0.1, high: 0.01}}", "tune.space.train.lr: low (0.1) must be below high (0.01)"),
    ("tune.space={train.lr: {low: 0, high: 1, log: true}}", "a log range needs low > 0"),
    ("tune.pruner=asha", "tune.pruner:"),
    ("train.lr.x=1", "cannot set train.lr.x: train.lr is not a section"),
])
def test_bad_params_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as err:
        load_config(REPO / "params.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_yaml_values():
    cfg = load_config(REPO / "params.yaml", ["train.lr=1e-3", "train.nesterov=true", "models=[cnn]"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.nesterov is True and cfg.models == ["cnn"]


def test_fingerprint_tracks_every_value():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.fingerprint() == load_config(REPO / "params.yaml").fingerprint()
    assert cfg.fingerprint() != cfg.with_overrides({"train.lr": 0.5}).fingerprint()


def test_cli_reports_bad_param_in_one_line_with_exit_2(tmp_path: Path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("prepare", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: train.lr: Input should be greater than 0 (got -1)"]
    assert not (tmp_path / "data").exists(), "a rejected config must not write outputs"


def test_cli_reports_missing_params_file(tmp_path: Path):
    result = run_cli("prepare", "--params", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params file not found: nope.yaml"


def test_cli_reports_broken_yaml(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("train: {epochs: 3\n")
    result = run_cli("prepare", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: params.yaml: not valid YAML at line")
    assert len(result.stderr.strip().splitlines()) == 1
