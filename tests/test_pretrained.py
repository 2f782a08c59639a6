"""Fine-tuning from pretrained weights, offline: the tests make a weights file, and serve it on 127.0.0.1 as a
mirror. Its bytes are not torchvision's published ones, so they are accepted only with their own SHA-256."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading

import pytest
import torch
from torchvision.models import mobilenet_v3_small

from pipeline import data, loop, models, optim, training
from pipeline.config import load_config
from pipeline.errors import UserError

from helpers import REPO

NAME = "mobilenet_v3_small"
WEIGHTS = {"model.name": NAME, "model.weights": "MobileNet_V3_Small_Weights.IMAGENET1K_V1"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(file, sha256, state): a mobilenet_v3_small state dict saved as torchvision publishes weights."""
    torch.manual_seed(0)
    state = mobilenet_v3_small(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small-custom.pth"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub cache in a temporary folder: what a download leaves there is visible to the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def served(weights, tmp_path):
    """The weights file (and a cut-off copy) on a real HTTP server on 127.0.0.1; counts requests."""
    folder = tmp_path / "served"
    folder.mkdir()
    blob = weights[0].read_bytes()
    (folder / weights[0].name).write_bytes(blob)
    (folder / "cut-off.pth").write_bytes(blob[:len(blob) // 2])
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()
    server.server_close()


def config(**changes):
    return load_config(REPO / "params.yaml", [f"{key}={value}" for key, value in {
        **WEIGHTS, "train.device": "cpu", "train.epochs": 2, "train.batch_size": 32, **changes}.items()])


def small(prepared: data.PreparedData, n: int = 64) -> data.PreparedData:
    """A slice of digits: a pretrained network sees 224x224 inputs, so a few batches are enough to test with."""
    return dataclasses.replace(prepared, train=data.Split(prepared.train.images[:n], prepared.train.labels[:n]),
                               val=data.Split(prepared.val.images[:n], prepared.val.labels[:n]))


class Snapshots(loop.Callback):
    """The backbone's parameters after every epoch."""

    def __init__(self):
        self.after: list[dict[str, torch.Tensor]] = []
        self.model = None

    def on_fit_start(self, model, history):
        self.model = model

    def on_epoch_end(self, metrics):
        self.after.append({k: v.detach().clone() for k, v in self.model.backbone.state_dict().items()})


def fit(cfg, prepared):
    model, train_batches, val_batches = training.setup(cfg, prepared, torch.device("cpu"))
    snapshots = Snapshots()
    loop.fit(model, train_batches, val_batches, cfg.train, torch.device("cpu"), [snapshots])
    return model, snapshots.after


def test_a_frozen_backbone_starts_from_the_file_and_never_changes(weights, digits):
    path, sha256, state = weights
    cfg = config(**{"model.weights_file": path, "model.weights_sha256": sha256, "model.freeze_backbone": "true"})
    model, after = fit(cfg, small(digits))

    assert isinstance(model, models.Pretrained) and model.weights_sha256 == sha256
    head_keys = {"classifier.3.weight", "classifier.3.bias"}
    pretrained = {k: v for k, v in state.items() if k not in head_keys}
    for epoch in after:  # parameters and BatchNorm statistics alike
        assert all(torch.equal(epoch[k], v) for k, v in pretrained.items())
    assert models.count_parameters(model) == sum(p.numel() for p in model.head.parameters())


def test_the_backbone_is_unfrozen_after_its_epochs_and_learns_at_its_own_rate(weights, digits):
    path, sha256, state = weights
    cfg = config(**{"model.weights_file": path, "model.weights_sha256": sha256, "model.freeze_backbone": "true",
                    "model.unfreeze_after": 1, "train.backbone_lr": 1e-4, "train.lr": 1e-2})
    model, after = fit(cfg, small(digits))

    key = "features.0.0.weight"
    assert torch.equal(after[0][key], state[key]) and not torch.equal(after[1][key], state[key])
    groups = optim.build_optimizer(optim.parameter_groups(model, cfg.train), cfg.train).param_groups
    assert [group["lr"] for group in groups] == [1e-2, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone.parameters()}


def test_weights_from_a_mirror_are_hash_checked_and_cached_once(weights, served, hub):
    path, sha256, _ = weights
    url, requests = served
    cfg = config(**{"model.weights_file": f"{url}/{path.name}", "model.weights_sha256": sha256})

    for _ in range(2):
        cached, actual = models.weights_path(cfg.model)
    assert cached == hub / path.name and actual == sha256 and len(requests) == 1


@pytest.mark.parametrize("case", ["wrong hash", "cut off"])
def test_a_wrong_or_truncated_download_is_one_line_and_caches_nothing(case, weights, served, hub):
    path, sha256, _ = weights
    url, _ = served
    name, expected = (path.name, "f" * 64) if case == "wrong hash" else ("cut-off.pth", sha256)
    cfg = config(**{"model.weights_file": f"{url}/{name}", "model.weights_sha256": expected})

    with pytest.raises(UserError) as error:
        models.weights_path(cfg.model)
    assert "\n" not in str(error.value) and name in str(error.value) and "nothing was cached" in str(error.value)
    assert not hub.exists() or not any(hub.iterdir())


def test_a_local_file_must_be_the_published_one_or_carry_its_hash(weights):
    path, sha256, _ = weights
    before = path.read_bytes()
    # without model.weights_sha256 the published hash (in torchvision's file name) is the reference
    with pytest.raises(UserError) as error:
        models.weights_path(config(**{"model.weights_file": path}).model)
    assert str(path) in str(error.value) and "not the published IMAGENET1K_V1" in str(error.value)
    assert path.read_bytes() == before  # the user's file is never touched

    truncated = path.with_name("truncated.pth")
    truncated.write_bytes(before[:1000])
    cut = hashlib.sha256(before[:1000]).hexdigest()
    with pytest.raises(UserError, match="cannot load model.weights from .*truncated.pth"):
        training.setup(config(**{"model.weights_file": truncated, "model.weights_sha256": cut}),
                       data.PreparedData(**_tiny_prepared()), torch.device("cpu"))


def _tiny_prepared() -> dict:
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    split = data.Split(images, torch.arange(20) % 2)
    return {"train": split, "val": split, "test": split, "classes": ["a", "b"], "mean": [0.5], "std": [0.2],
            "md5": "0" * 32}


@pytest.mark.parametrize("changes, culprit", [
    ({"model.name": "cnn", "model.weights": "IMAGENET1K_V1"}, "model.weights"),
    ({"model.weights": "null", "model.freeze_backbone": "true"}, "model.freeze_backbone"),
    ({"model.weights": "null", "train.backbone_lr": 0.1}, "train.backbone_lr"),
    ({"model.weights_sha256": "xyz"}, "weights_sha256"),
])
def test_pretrained_settings_are_validated_at_the_edge(changes, culprit):
    with pytest.raises(UserError, match=culprit):
        config(**changes)
    with pytest.raises(UserError, match="not a weight of mobilenet_v3_small"):
        models.resolve_weights(NAME, "ResNet18_Weights.IMAGENET1K_V1")


def test_comparison_models_without_weights_train_from_scratch(weights):
    path, sha256, _ = weights
    cfg = config(**{"model.weights_file": path, "model.weights_sha256": sha256, "model.freeze_backbone": "true",
                    "train.backbone_lr": 1e-4})
    assert cfg.for_model("resnet18").model.weights == cfg.model.weights
    plain = cfg.for_model("logreg")
    assert plain.model.weights is None and not plain.model.freeze_backbone and plain.train.backbone_lr is None


def test_resnet18_keeps_its_imagenet_stem_and_loads_every_backbone_weight(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    cfg = config(**{"model.name": "resnet18", "model.weights": "ResNet18_Weights.IMAGENET1K_V1",
                    "model.weights_file": path, "model.weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    model = models.build_model(cfg.model, (1, 8, 8), 3)
    models.start_from_weights(model, cfg.model)

    assert model.backbone.conv1.kernel_size == (7, 7) and model.size == 224  # the weights' stem and crop size
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert model.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 3)
