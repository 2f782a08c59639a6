"""Model zoo, from the tutorials' logistic regression to a torchvision ResNet.

Every builder adapts to the data: input shape (C, H, W) and number of classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

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


def resnet18(cfg: ModelConfig, shape: Shape, classes: int) -> nn.Module:
    """torchvision's ResNet-18 for small images: 3x3 stride-1 stem and no max-pool (CIFAR-style)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=classes)
    model.conv1 = nn.Conv2d(shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


# One builder per name of config.ModelName (a test keeps the two in step).
BUILDERS: dict[str, Callable[[ModelConfig, Shape, int], nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn": cnn,
    "digit_recognizer": digit_recognizer,
    "resnet18": resnet18,
}


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


def save_model(path: Path, state_dict: dict, cfg: Config, classes: list[str], input_shape: Shape,
               mean: list[float], std: list[float], **info) -> None:
    """Weights plus everything needed to rebuild and feed the model; loads with weights_only=True.

    Only what determines the model goes in: the params that shape training (the train stage's deps), no run ids,
    no timings, no store URLs. A deterministic re-run writes the same bytes, and no undeclared param changes them.
    """
    payload = {"state_dict": state_dict, "config": cfg.subset(training_keys()), "classes": list(classes),
               "input_shape": list(input_shape), "mean": list(mean), "std": list(std), **info}
    files.save_torch(payload, path)


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """(model in eval mode on the CPU, the saved payload). Never unpickles arbitrary objects."""
    if not Path(path).exists():
        raise UserError(f"model file missing: {path} (train it first: `dvc repro` or `python -m pipeline train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(ModelConfig.model_validate(payload["config"]["model"]), payload["input_shape"],
                            len(payload["classes"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # noqa: BLE001 - any unreadable or foreign file is the same user-facing problem
        raise UserError(f"cannot read model file {path}: {first_line(err)}") from None
    return model.eval(), payload


def load_classifier(path: Path) -> Classifier:
    model, payload = load_model(path)
    return Classifier(model, payload["mean"], payload["std"], payload["classes"], payload["input_shape"]).eval()
