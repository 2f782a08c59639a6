"""Model zoo, from the tutorials' logistic regression to torchvision's ResNet-18 and MobileNetV3.

Every builder adapts to the data: input shape (C, H, W) and number of classes.
Building never touches the network or the disk: a torchvision model with
`model.weights` is built as a `Pretrained` (its standard ImageNet stem, its own
preprocessing, a new head for the data's classes), and `start_from_weights`
loads the verified weights into it when training starts.
"""

from __future__ import annotations

import math
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import files
from pipeline.config import Config, ModelConfig, training_keys
from pipeline.errors import UserError, first_line

Shape = tuple[int, int, int]


def logistic_regression(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    """The tutorials' LogisticRegression: one linear layer on flattened pixels (softmax lives in the loss)."""
    c, h, w = shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes))


def mlp(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    """The tutorials' SimpleNN: fully connected ReLU layers with dropout."""
    c, h, w = shape
    layers: list[nn.Module] = [nn.Flatten()]
    width = c * h * w
    for hidden in cfg.hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout)]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def cnn(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    """The tutorials' SimpleCNN: (conv-BN-ReLU-maxpool) blocks, then a small classifier head."""
    c, h, w = shape
    layers: list[nn.Module] = []
    for width in cfg.channels:
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if min(h, w) >= 2:  # 8x8 digits run out of pixels before CIFAR does
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = width
    head_width = cfg.hidden_sizes[0]
    layers += [nn.Flatten(), nn.Linear(c * h * w, head_width), nn.ReLU(inplace=True),
               nn.Dropout(cfg.dropout), nn.Linear(head_width, classes)]
    return nn.Sequential(*layers)


def digit_recognizer(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    """The tutorials' DigitRecognizer, LeNet-5 style: 5x5 convs 6 -> 16, then 120 -> 84 -> classes."""
    c, h, w = shape
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, classes),
    )


class Pretrained(nn.Module):
    """A pretrained torchvision backbone with a new head, fed as its weights expect.

    Takes pixels scaled to [0, 1] (see `input_stats`) at the data's size, and
    applies the weights' own preprocessing on the device: resize to their crop
    size, grey replicated to RGB, their normalisation. With `freeze_backbone`
    the backbone's parameters get no gradients for the first `unfreeze_after`
    epochs (0: for good) and its BatchNorm layers keep their pretrained
    statistics meanwhile (eval mode), as fine-tuning guides advise. The loop
    calls `set_epoch` before each epoch, as PyTorch's samplers have it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, size: int, mean: list[float], std: list[float],
                 freeze_backbone: bool = False, unfreeze_after: int = 0, replaced: str = ""):
        super().__init__()
        self.backbone, self.head, self.size = backbone, head, size
        self.replaced = replaced  # the backbone's own classifier (a module path): its weights are not loaded
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.freeze_backbone, self.unfreeze_after = freeze_backbone, unfreeze_after
        self.frozen = False
        self.weights_sha256: str | None = None  # of the file training started from (lineage)

    def set_epoch(self, epoch: int) -> None:
        self.frozen = self.freeze_backbone and (self.unfreeze_after == 0 or epoch <= self.unfreeze_after)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Pretrained:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.head(self.backbone((x - self.mean) / self.std))


def _pretrained(cfg: ModelConfig, classes: int, backbone: nn.Module, classifier: str) -> Pretrained:
    """`backbone` with its `classifier` (a module path such as "fc") cut off, and a new head for `classes`."""
    parent_name, _, name = classifier.rpartition(".")
    parent = backbone.get_submodule(parent_name)
    features = getattr(parent, name).in_features
    setattr(parent, name, nn.Identity())
    preprocess = resolve_weights(cfg.name, cfg.weights).transforms()
    return Pretrained(backbone, nn.Linear(features, classes), preprocess.crop_size[0], list(preprocess.mean),
                      list(preprocess.std), cfg.freeze_backbone, cfg.unfreeze_after, replaced=classifier)


def resnet18(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    """torchvision's ResNet-18. From scratch: for small images, a 3x3 stride-1 stem and no max-pool (CIFAR-style).
    With `model.weights`: the ImageNet stem as trained and a new head."""
    from torchvision.models import resnet18 as tv_resnet18

    if cfg.weights:
        return _pretrained(cfg, classes, tv_resnet18(weights=None), "fc")
    model = tv_resnet18(weights=None, num_classes=classes)
    model.conv1 = nn.Conv2d(shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mobilenet_v3_small(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    """torchvision's MobileNetV3-Small (2.5M parameters): a backbone cheap enough to fine-tune on a CPU."""
    from torchvision.models import mobilenet_v3_small as tv_mobilenet

    if cfg.weights:
        return _pretrained(cfg, classes, tv_mobilenet(weights=None, dropout=cfg.dropout), "classifier.3")
    model = tv_mobilenet(weights=None, num_classes=classes, dropout=cfg.dropout)
    if shape[0] != 3:
        model.features[0][0] = nn.Conv2d(shape[0], 16, kernel_size=3, stride=2, padding=1, bias=False)
    return model


# One builder per name of config.ModelName (a test keeps the two in step).
BUILDERS: dict[str, Callable[[ModelConfig, Shape, int], nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn": cnn,
    "digit_recognizer": digit_recognizer,
    "resnet18": resnet18,
    "mobilenet_v3_small": mobilenet_v3_small,
}
PRETRAINED = ("resnet18", "mobilenet_v3_small")  # torchvision builders with published weights


# ---------------------------------------------------------------- pretrained weights

def resolve_weights(model_name: str, name: str):
    """torchvision's weights enum member for `name` ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT")."""
    from torchvision.models import get_model_weights

    if model_name not in PRETRAINED:
        raise UserError(f"model.weights: {model_name} has no published weights; use one of {', '.join(PRETRAINED)}")
    enum = get_model_weights(model_name)
    prefix, _, member = name.rpartition(".")
    try:
        if prefix and prefix != enum.__name__:
            raise KeyError(name)
        return enum[member]
    except KeyError:
        choices = ", ".join(f"{enum.__name__}.{weights.name}" for weights in enum)
        raise UserError(f"model.weights {name!r} is not a weight of {model_name}; choose {choices}") from None


def published_sha256(url: str) -> str:
    """The SHA-256 prefix torchvision publishes in each weights file's name (resnet18-f37072fd.pth)."""
    match = re.search(r"-([0-9a-f]{8,64})\.pth$", url)
    if match is None:
        raise UserError(f"no published hash in {url}: set model.weights_sha256")
    return match.group(1)


def weights_path(cfg: ModelConfig) -> tuple[Path, str]:
    """(verified local file, its SHA-256) of `cfg.weights`: a local `weights_file`, or a download (torchvision's
    URL, or `weights_file` as a mirror URL) into torch's hub cache, checked against the published hash or
    `weights_sha256`. Nothing unverified is cached; a user's own file is never touched."""
    weights = resolve_weights(cfg.name, cfg.weights)
    expected = cfg.weights_sha256 or published_sha256(weights.url)
    source = cfg.weights_file or weights.url
    if urlsplit(source).scheme in ("http", "https", "file"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(source).path).name
        if not (path.is_file() and files.file_digest(path, "sha256").startswith(expected)):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # to a temporary file, hash-checked, then renamed: a wrong or cut-off download leaves nothing
                torch.hub.download_url_to_file(source, str(path), hash_prefix=expected, progress=False)
            except RuntimeError as err:
                raise UserError(f"model.weights from {source}: {first_line(err)}; nothing was cached") from None
            except OSError as err:
                raise UserError(f"cannot download model.weights from {source}: {first_line(err)}; on a machine "
                                "without internet set model.weights_file to a local copy or mirror URL") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"model.weights_file {path} not found; point it at the downloaded .pth file")
    actual = files.file_digest(path, "sha256")
    if not actual.startswith(expected):
        raise UserError(f"model.weights_file {path} has SHA-256 {actual}, expected {expected}...: not the "
                        f"published {weights.name} file (set model.weights_sha256 if it is your own)")
    return path, actual


def start_from_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Load the verified pretrained weights into a `Pretrained` model's backbone (its new head stays as built)."""
    if not isinstance(model, Pretrained):
        return
    path, sha256 = weights_path(cfg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith(f"{model.replaced}.")})
    except Exception as err:  # noqa: BLE001 - a truncated, foreign or mismatched file is the same user problem
        raise UserError(f"cannot load model.weights from {path}: {first_line(err)}") from None
    model.weights_sha256 = sha256
    print(f"{cfg.name}: starting from {cfg.weights} ({path}, sha256 {sha256[:12]})", file=sys.stderr)


def input_stats(cfg: ModelConfig, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """The normalisation the data path applies before the model: the data's own statistics, or none for a
    `Pretrained` model (pixels in [0, 1]), which normalises as its weights expect."""
    if cfg.weights:
        return [0.0] * len(mean), [1.0] * len(std)
    return mean, std


def build_model(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    return BUILDERS[cfg.name](cfg, tuple(shape), classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Classifier(nn.Module):
    """Pixels scaled to [0, 1] in, class probabilities out: the form MLflow serves and `predict` uses."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], classes: list[str],
                 input_shape: Shape):
        super().__init__()
        self.model, self.classes, self.input_shape = model, list(classes), tuple(input_shape)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std).softmax(dim=1)


# what a model file holds besides `info` (run name, best epoch, data md5): `load_model` refuses a file without one
MODEL_FILE_KEYS = ("state_dict", "config", "classes", "input_shape", "mean", "std")


def save_model(path: Path, state_dict: dict, cfg: Config, classes: list[str], input_shape: Shape,
               mean: list[float], std: list[float], **info) -> None:
    """Weights plus everything needed to rebuild and feed the model; loads with weights_only=True.

    Only what determines the model goes in: the params that shape training (the train stage's deps), no run ids,
    no timings, no store URLs. A deterministic re-run writes the same bytes, and no undeclared param changes them.
    """
    payload = dict(zip(MODEL_FILE_KEYS, (state_dict, cfg.subset(training_keys()), list(classes), list(input_shape),
                                         list(mean), list(std))), **info)
    files.save_torch(payload, path)


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """(model in eval mode on the CPU, the saved payload). Never unpickles arbitrary objects."""
    if not Path(path).exists():
        raise UserError(f"model file missing: {path} (train it first: `dvc repro` or `python -m pipeline train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own advice (load it with weights_only=False) is wrong for such a file
        raise UserError(f"cannot read model file {path}: it holds pickled Python objects, so it is no model file "
                        "this pipeline wrote, and it is never loaded") from None
    except Exception as err:  # noqa: BLE001 - truncated, empty or foreign bytes are the same user-facing problem
        raise UserError(f"cannot read model file {path}: {first_line(err)}") from None
    missing = [key for key in MODEL_FILE_KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise UserError(f"model file {path} lacks {', '.join(missing)}: it is no model file this pipeline wrote; "
                        "train it again (`dvc repro`)")
    if not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in payload["std"]):
        raise UserError(f"model file {path} has input std {payload['std']}: every channel's must be a positive "
                        "number, or its inputs would be divided by zero; train it again (`dvc repro`)")
    try:
        model = build_model(ModelConfig.model_validate(payload["config"]["model"]), payload["input_shape"],
                            len(payload["classes"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # noqa: BLE001 - any unreadable or foreign file is the same user-facing problem
        raise UserError(f"cannot read model file {path}: {first_line(err)}") from None
    return model.eval(), payload


def load_classifier(path: Path) -> Classifier:
    model, payload = load_model(path)
    return Classifier(model, payload["mean"], payload["std"], payload["classes"], payload["input_shape"]).eval()
