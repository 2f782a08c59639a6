"""The real entry points on tiny settings: `python -m pipeline ...` and `dvc repro` in a temporary repository."""

import json

import pytest

from helpers import edit_params, git, run_cli, run_dvc, stores, write_digit_folder

pytestmark = pytest.mark.slow

# no confirmation over seeds after the search: test_fresh_clone runs the default one end to end
TINY = {"train.epochs": 2, "comparison": ["logreg"], "tune.n_trials": 3, "tune.epochs": 2, "tune.startup_trials": 1,
        "tune.confirm": 0}
UNTRACKED = {**TINY, "tracking.enabled": False}  # for tests about something else: MLflow costs ~3 s a process


def test_train_without_prepared_data_is_a_one_line_error(repo_copy):
    result = run_cli("train", cwd=repo_copy)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: prepared data missing: data/prepared/tensors.pt "
                                     "(run `python -m pipeline prepare` or `dvc repro prepare`)")


def test_an_experiment_in_a_temporary_copy_logs_to_the_root_store(repo_copy):
    """DVC runs queued and --temp experiments in copies under .dvc/tmp/; their runs must land in the repo's store."""
    edit_params(repo_copy, {**TINY, "train.epochs": 1, "comparison": ["logreg"], "model.name": "logreg",
                            "tracking.log_models": False, "tune.n_trials": 1})
    git(repo_copy, "commit", "-qam", "tiny")
    # --temp runs in the same kind of copy under .dvc/tmp/exps/ as `dvc queue` workers, without the queue's workers
    experiment = run_dvc("exp", "run", "--temp", "-S", "train.lr=0.02", "train@logreg", cwd=repo_copy)
    assert experiment.returncode == 0, experiment.stdout + experiment.stderr
    _, runs = stores(repo_copy)
    runs = [r for r in runs if r.info.status == "FINISHED"]
    # in the repo's own store: the model's run and its seed replicates'
    assert sorted((r.data.tags["pipeline.role"], r.data.tags["pipeline.level"]) for r in runs) == \
        [("logreg", "model")] + [("logreg", "replicate")] * 3
    assert all(r.data.tags.get("dvc.exp_name") for r in runs), [r.data.tags for r in runs]
    assert {r.data.params["train.lr"] for r in runs} == {"0.02"}
    assert not (repo_copy / ".dvc/tmp/exps").exists() or not list((repo_copy / ".dvc/tmp/exps").rglob("mlflow.db"))


def test_folder_dataset_through_dvc_exp_run(repo_copy, tmp_path):
    images = tmp_path / "images"
    assert write_digit_folder(images) == 300
    edit_params(repo_copy, {**UNTRACKED, "train.epochs": 15, "train.lr": 0.05, "comparison": ["logreg"],
                            "model.name": "logreg"})
    git(repo_copy, "commit", "-qam", "tiny")
    result = run_dvc("exp", "run", "-S", "data.name=folder", "-S", f"data.path={images}", "-S", "data.channels=1",
                     "-S", "data.image_size=8", "train@logreg", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((repo_copy / "data/prepared/meta.json").read_text())
    assert meta["classes"] == [f"digit_{i}" for i in range(10)] and meta["shape"] == [1, 8, 8]
    assert sum(meta["sizes"].values()) == 300
    manifest = json.loads((repo_copy / "data/raw/folder/manifest.json").read_text())
    assert len(manifest["files"]) == 300  # what DVC tracks of a folder outside the repo
    accuracy = json.loads((repo_copy / "reports/train/logreg/metrics.json").read_text())["val_accuracy"]
    assert accuracy > 0.6, f"validation accuracy {accuracy} is not well above chance (0.1)"


def test_mnist_copy_in_torchvision_layout_is_used_by_dvc_repro_without_network(repo_copy):
    """The user's uncompressed MNIST files in torchvision's layout (here a private copy: its MD5s in
    data.checksums); the mirror is a closed port, so any download attempt would fail the stage."""
    import gzip

    from helpers.archives import md5, mnist_files

    fake = mnist_files(n_train=200, n_test=50)
    folder = repo_copy / "data" / "raw" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    checksums = {}
    for name, blob in fake.files.items():
        plain = gzip.decompress(blob)
        (folder / name.removesuffix(".gz")).write_bytes(plain)
        checksums[name.removesuffix(".gz")] = md5(plain)
    edit_params(repo_copy, {**UNTRACKED, "data.name": "mnist", "data.checksums": checksums,
                            "data.mirror": "http://127.0.0.1:9/"})

    result = run_dvc("repro", "prepare", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "using local copy" in result.stderr and "downloading" not in result.stderr
    meta = json.loads((repo_copy / "data" / "prepared" / "meta.json").read_text())
    assert meta["sizes"]["test"] == 50 and sum(meta["sizes"].values()) == 250


def test_a_folder_fine_tunes_from_a_local_weights_file_through_dvc_exp_run(repo_copy, tmp_path):
    """The transfer-learning path: a pretrained backbone (here a weights file made by the test, so its own
    SHA-256 is given) with a frozen backbone on a folder of images; MLflow records what training started from."""
    import hashlib

    import torch
    from torchvision.models import mobilenet_v3_small

    images = tmp_path / "images"
    write_digit_folder(images, per_class=20)
    weights = tmp_path / "mobilenet.pth"
    torch.save(mobilenet_v3_small(weights=None).state_dict(), weights)
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    edit_params(repo_copy, {**TINY, "comparison": ["mobilenet_v3_small"], "train.epochs": 1, "replicates": 1})
    git(repo_copy, "commit", "-qam", "tiny")

    result = run_dvc("exp", "run", "-S", "data.name=folder", "-S", f"data.path={images}", "-S", "data.image_size=32",
                     "-S", "model.name=mobilenet_v3_small", "-S", "model.weights=IMAGENET1K_V1",
                     "-S", f"model.weights_file={weights}", "-S", f"model.weights_sha256='{sha256}'",
                     "-S", "model.freeze_backbone=true", "train@mobilenet_v3_small", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"starting from IMAGENET1K_V1 ({weights}" in result.stderr
    client, runs = stores(repo_copy)
    run, = runs
    assert run.data.tags["model.weights_sha256"] == sha256
    assert run.data.params["model.weights"] == "IMAGENET1K_V1" and run.data.params["model.freeze_backbone"] == "True"


def test_dvc_exp_run_set_param_changes_exactly_that_line_of_params_yaml(repo_copy):
    """params.yaml is kept in the form DVC writes back (block lists, empty nulls, no comment after a list), so
    `dvc exp run -S key=value` changes that key's line and nothing else: it rewrote 37 lines for one key."""
    before = (repo_copy / "params.yaml").read_text().splitlines()
    result = run_dvc("exp", "run", "-S", "train.epochs=5", "-S", "model.dropout=0.3", "download", cwd=repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    after = (repo_copy / "params.yaml").read_text().splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(after) == len(before)
    assert changed == [("  dropout: 0.2", "  dropout: 0.3"), ("  epochs: 30", "  epochs: 5")]
    assert git(repo_copy, "diff", "--numstat", "params.yaml").stdout.split()[:2] == ["2", "2"]
