"""params.yaml -> one typed, validated, immutable Config.

Everything downstream receives plain config objects; nothing re-reads params.
Validation errors become one-line `UserError`s that name the dotted key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from pipeline.errors import UserError

DatasetName = Literal["digits", "mnist", "fashion_mnist", "cifar10", "folder"]
ModelName = Literal["logreg", "mlp", "cnn", "digit_recognizer", "resnet18"]


class Section(BaseModel):
    # extra="forbid" is what turns a typo like `train.lrr` into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(Section):
    crop_padding: int = Field(0, ge=0, le=8, description="random translation by up to N pixels (RandomCrop(padding=N))")
    hflip: bool = Field(False, description="random horizontal flip (never for digits)")


class DataConfig(Section):
    name: DatasetName = "digits"
    path: str | None = Field(None, description="image folder for data.name=folder")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="only for datasets without an official test split")
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(Section):
    name: ModelName = "cnn"
    dropout: float = Field(0.2, ge=0, lt=1)
    hidden_sizes: list[PositiveInt] = Field([128, 64], min_length=1, description="mlp layer widths")
    channels: list[PositiveInt] = Field([32, 64], min_length=1, description="cnn conv widths, one pooled block each")


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["none", "step", "plateau", "cosine", "onecycle"] = "cosine"
    step_size: int = Field(10, ge=1, description="epochs between decays (scheduler=step)")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor (step, plateau)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0 = off")
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    patience: int = Field(0, ge=0, description="early-stopping patience in epochs; 0 = off")
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True
    drop_last: bool = False
    resume: bool = Field(True, description="continue from checkpoints/<name>/last.pt when its config matches")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda", "mps") or (index and not (base == "cuda" and index.isdigit())):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


class Config(Section):
    seed: int = 42
    data: DataConfig = DataConfig()
    models: list[ModelName] = Field(["logreg", "mlp", "cnn"], min_length=1, description="the comparison matrix")
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A new validated Config with dotted keys replaced (e.g. tuned values)."""
        raw = self.model_dump()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return _validate(raw, source="overrides")

    def fingerprint(self) -> str:
        """Short stable hash of the whole config: names runs and guards checkpoint reuse."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as `dvc exp run -S` and MLflow params spell them."""
        return flatten(self.model_dump())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Config:
    """Read params.yaml, apply `key=value` overrides, validate. Raises UserError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"params file not found: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text else None)
    return _validate(raw, source=str(path))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set {key}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = value


def _validate(raw: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, source)) from None


def describe_validation_error(err: ValidationError, source: str) -> str:
    """The first problem as one line naming the dotted key; a count of the rest."""
    problems = err.errors()
    first = problems[0]
    key = dotted(first["loc"])
    if first["type"] == "extra_forbidden":
        parent = _section_at(first["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        message = f"unknown key {key!r} (allowed here: {allowed})"
    else:
        message = f"{key}: {first['msg']} (got {first.get('input')!r})"
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{source}: {message}{more}"


def dotted(loc: tuple) -> str:
    """('models', 1) -> 'models[1]'; ('train', 'lr') -> 'train.lr'."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _section_at(loc: tuple) -> type[BaseModel] | None:
    section: type[BaseModel] = Config
    for part in loc:
        field = section.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section
