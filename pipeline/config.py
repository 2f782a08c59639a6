"""params.yaml -> one typed, validated, immutable Config.

Everything downstream receives plain config objects; nothing re-reads params.
Validation errors become one-line `UserError`s that name the dotted key and
where it came from (the params file or a `--set` override). The key lists at
the end say which params shape which result: run names, checkpoints, study
names and the `params:` of every stage in dvc.yaml all derive from them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError, redact, shorten
from pipeline.metrics import DIRECTIONS, Monitor

MAX_PARAMS_BYTES = 1 << 20
MAX_EPOCHS = 100_000  # every count has a bound, checked before anything runs: 10**23 epochs is a typo
MAX_REPLICATES = 64  # each one's model is held in memory while they train together
LR_FIND_SKIP = (10, 5)  # the range test reads its suggestion without its first and last steps (lr_finder)
Width = Annotated[int, Field(ge=1, le=65_536)]  # a layer's width
DatasetName = Literal["digits", "mnist", "fashion_mnist", "cifar10", "folder"]  # datasets.KINDS (one list: a test)
ModelName = Literal["logreg", "mlp", "cnn", "digit_recognizer", "resnet18", "mobilenet_v3_small"]
PretrainedName = Literal["resnet18", "mobilenet_v3_small"]  # the models torchvision publishes weights for


class Section(BaseModel):
    # extra="forbid" turns a typo like `train.lrr` into an error instead of a silent default; strict=True keeps a
    # value of another type from passing as one (`epochs: true` is not 1 epoch, `lr: "0.1"` not a number).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AugmentConfig(Section):
    crop_padding: int = Field(0, ge=0, le=8, description="random translation by up to N pixels (RandomCrop(padding=N))")
    hflip: bool = Field(False, description="random horizontal flip (never for digits)")
    rotation: float = Field(0.0, ge=0, le=180, description="random rotation by up to +-N degrees")
    brightness: float = Field(0.0, ge=0, lt=1, description="ColorJitter: brightness factor in [1-b, 1+b]")
    contrast: float = Field(0.0, ge=0, lt=1, description="ColorJitter: contrast factor in [1-c, 1+c]")
    saturation: float = Field(0.0, ge=0, lt=1, description="ColorJitter: saturation factor in [1-s, 1+s] (RGB)")


class DataConfig(Section):
    name: DatasetName = Field("digits", description="digits (bundled with scikit-learn, offline), mnist, "
                                                     "fashion_mnist, cifar10 (torchvision's files) or folder")
    path: str | None = Field(None, description="folder: the image folder (one sub-folder per class); mnist, "
                                               "fashion_mnist, cifar10: a local copy of the official files")
    mirror: str | None = Field(None, description="base URL (http(s):// or file://) replacing torchvision's mirrors")
    retries: int = Field(3, ge=0, le=10, description="download retries per file on transient errors")
    image_size: int = Field(32, ge=4, le=1024, description="folder images are resized to this square size")
    channels: Literal[1, 3] = Field(3, description="folder images are converted to L (1) or RGB (3)")
    skip_bad_images: bool = Field(False, description="skip unreadable folder images (counted) instead of failing")
    follow_symlinks: bool = Field(False, description="folder: follow symlinks that lead outside data.path "
                                                     "(refused by default; followed files are tracked too)")
    checksums: dict[str, str] = Field({}, description="file name -> MD5 accepted besides the official one "
                                                      "(private copies of mnist/fashion_mnist/cifar10 files)")
    memory_limit_mb: float = Field(2048, ge=0, le=2**20,
                                   description="prepared data up to this size stays resident on the training device; "
                                               "larger data is streamed from disk")
    loader_workers: int = Field(2, ge=0, le=64, description="streamed data: DataLoader worker processes reading "
                                                            "batches ahead of the device")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="validation split carved from the training part, "
                                                               "stratified")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="only for datasets without an official test split")
    split_seed: int = Field(42, ge=0, lt=2**32, description="seeds the train/val(/test) split, and nothing else: "
                                                            "another seed (a replicate, a trial, -S seed=...) varies "
                                                            "training only, on the same test images")
    augment: AugmentConfig = AugmentConfig()

    @field_validator("mirror")
    @classmethod
    def _mirror_scheme(cls, value: str | None) -> str | None:
        if value is not None and value.split("://", 1)[0].lower() not in ("http", "https", "file"):
            raise ValueError(f"{value!r}: a mirror is an http://, https:// or file:// base URL")
        return value

    @field_validator("checksums")
    @classmethod
    def _md5s(cls, value: dict[str, str]) -> dict[str, str]:
        for name, md5 in value.items():
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise ValueError(f"{name!r}: keys are bare file names, e.g. train-images-idx3-ubyte")
            if re.fullmatch(r"[0-9a-f]{32}", md5.lower()) is None:
                raise ValueError(f"{name}: {md5!r} is not an MD5 (32 hex digits)")
        return {name: md5.lower() for name, md5 in value.items()}

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DataConfig:
        if self.name == "folder" and not self.path:
            raise ValueError("data.path is required when data.name is folder")
        return self


class ModelConfig(Section):
    name: ModelName = Field("cnn", description="the final model (and the one `tune` searches for)")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout rate before each classifier layer")
    hidden_sizes: list[Width] = Field([128, 64], min_length=1, max_length=16, description="mlp layer widths")
    channels: list[Width] = Field([32, 64], min_length=1, max_length=16,
                                  description="cnn conv widths, one pooled block each")
    weights: str | None = Field(None, description="torchvision weights to fine-tune from (resnet18, "
                                                  "mobilenet_v3_small), e.g. IMAGENET1K_V1 or ResNet18_Weights.DEFAULT")
    weights_file: str | None = Field(None, description="weights: a local .pth file or a mirror URL instead of "
                                                       "torchvision's download (air-gapped machines)")
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{8,64}$",
                                       description="weights: expected SHA-256 (or prefix); default the published one")
    freeze_backbone: bool = Field(False, description="weights: train the new head only (see unfreeze_after)")
    unfreeze_after: int = Field(0, ge=0, le=MAX_EPOCHS,
                                description="freeze_backbone: fine-tune everything after this many epochs; 0 = the "
                                            "backbone stays frozen")

    @model_validator(mode="after")
    def _weights_settings(self) -> ModelConfig:
        if self.weights is not None and self.name not in get_args(PretrainedName):
            raise ValueError(f"model.weights: {self.name} has no published weights; use "
                             f"{' or '.join(get_args(PretrainedName))}")
        pretrained_only = {"weights_file": self.weights_file, "weights_sha256": self.weights_sha256,
                           "freeze_backbone": self.freeze_backbone, "unfreeze_after": self.unfreeze_after}
        for key, value in pretrained_only.items():
            if value and self.weights is None:
                raise ValueError(f"model.{key} needs model.weights (a pretrained model)")
        if self.unfreeze_after and not self.freeze_backbone:
            raise ValueError("model.unfreeze_after needs model.freeze_backbone=true")
        return self


class TrainConfig(Section):
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS, description="epochs per training run (trials run tune.epochs)")
    batch_size: int = Field(64, ge=1, le=2**20,
                            description="samples per step (the global batch with several processes)")
    lr: float = Field(1e-3, gt=0, description="learning rate (a one-cycle schedule's peak)")
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = Field("adam", description="torch.optim's optimizer")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and rmsprop")
    nesterov: bool = Field(False, description="sgd with momentum")
    weight_decay: float = Field(1e-5, ge=0, description="L2 penalty (decoupled for adamw)")
    scheduler: Literal["none", "step", "plateau", "cosine", "onecycle"] = Field(
        "cosine", description="learning-rate schedule: per epoch, one-cycle per step")
    step_size: int = Field(10, ge=1, le=MAX_EPOCHS, description="epochs between decays (scheduler=step)")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor (step, plateau)")
    backbone_lr: float | None = Field(None, gt=0, description="learning rate of a pretrained backbone (default "
                                                             "train.lr; fine-tuning often uses lr/10)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0 = off")
    monitor: Monitor = Field("val_loss", description="picks the best epoch (and drives plateau and early stopping)")
    monitor_window: int = Field(3, ge=1, le=MAX_EPOCHS, description="the epoch that ships ends the best window of "
                                "this many epochs by mean monitored value, so one lucky validation pass does not "
                                "choose it (and patience counts windows); 1 = the single best epoch")
    patience: int = Field(0, ge=0, le=MAX_EPOCHS, description="early-stopping patience in epochs; 0 = off")
    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto: bf16 on CUDA (fp16 without it) and on CPUs with native bf16 for "
                            "convolutional models, else fp32")
    channels_last: Literal["auto"] | bool = Field("auto", description="channels_last memory format; auto: for "
                                                                      "models with convolutions")
    threads: int | None = Field(None, ge=1, le=4096,
                                description="CPU threads per process (torch.set_num_threads); null: the cores this "
                                            "process may use, shared out among processes that train at once (tune "
                                            "--workers, train --nproc). It shapes results (summation order), so runs "
                                            "record it")
    compile: bool = Field(False, description="torch.compile the model")
    deterministic: bool = Field(True, description="reproducible kernels: identical metrics for identical params "
                                                  "on CPU")
    drop_last: bool = Field(False, description="drop the last incomplete training batch of each epoch")
    resume: bool = Field(True, description="continue an interrupted run from its resume point in checkpoints/<run>/ "
                                           "(only with the same config, data and code)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda", "mps") or (index and not (base == "cuda" and index.isdigit())):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


class TrackingConfig(Section):
    enabled: bool = Field(True, description="log runs to MLflow (off: MLflow is never imported)")
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<repo>/mlflow.db; "
                                               "MLFLOW_TRACKING_URI overrides")
    experiment: str | None = Field(None, description="MLflow experiment; default data.name")
    flush_every_s: float = Field(5.0, ge=0, le=3600,
                                 description="epoch metrics are sent in one batch at most this often")
    log_models: bool = Field(True, description="log each model as an MLflow model; the final one is registered")
    system_metrics: bool = Field(False, description="CPU/RAM (and GPU) usage via MLflow system metrics")
    tensorboard: bool = Field(True, description="also write each training run's curves for TensorBoard, under "
                                                "<repo>/runs (`make ui` serves them)")


class LrFindConfig(Section):
    min_lr: float = Field(1e-7, gt=0, description="the range test's first learning rate")
    max_lr: float = Field(10.0, gt=0, le=1e6, description="its last: the loss has diverged well before it")
    steps: int = Field(100, ge=sum(LR_FIND_SKIP) + 2, le=100_000,
                       description="training steps, one per rate, geometrically from min_lr to max_lr (the "
                                   "suggestion is read without the first 10 and the last 5)")

    @model_validator(mode="after")
    def _a_range(self) -> LrFindConfig:
        if not self.min_lr < self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must be below max_lr ({self.max_lr:g})")
        return self


class SearchDimension(Section):
    """One searched param: a numeric range (low/high, optional log/step) or a list of choices."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either low/high or choices, not both")
        elif self.low is None or self.high is None:
            raise ValueError("needs low and high, or choices")
        elif not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        elif self.log and self.step is not None:
            raise ValueError("give either log or step, not both (Optuna samples one or the other)")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def candidates(self) -> list[Any]:
        """Values that bound what the sampler can return: enough to validate them once."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class TrialResources(Section):
    """What Ray Tune reserves for each trial (tune.engine ray)."""

    cpu: float = Field(1, gt=0, le=1024, description="CPUs per trial (its torch threads: the whole part)")
    gpu: float = Field(0, ge=0, le=64, description="GPUs per trial; a fraction shares one GPU among trials")


class TuneConfig(Section):
    n_trials: int = Field(24, ge=1, le=100_000,
                          description="trials counted: complete + pruned + running, across all workers")
    timeout: float | None = Field(None, gt=0, le=366 * 86400,
                                  description="seconds per worker; stop starting trials after it")
    epochs: int = Field(15, ge=1, le=MAX_EPOCHS,
                        description="epochs per trial (independent of train.epochs, so changing train.epochs never "
                                    "re-runs the search)")
    metric: Monitor = Field("val_loss", description="what the search minimises or maximises, per epoch")
    sampler: Literal["tpe", "random", "cmaes", "gp"] = Field("tpe", description="Optuna sampler, seeded from seed")
    # Successive halving (asynchronous, like ASHA) judges a trial against every trial that reached the same epoch,
    # running ones included, so a population's members are pruned as they go; the median pruner waits for
    # completed trials, which a population only has late. `make bench` measures the share of epochs it saves.
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = Field(
        "successive_halving", description="Optuna pruner on the per-epoch metric")
    startup_trials: int = Field(5, ge=0, le=100_000, description="trials sampled at random before TPE (and the median "
                                                     "pruner) act")
    warmup_epochs: int = Field(3, ge=0, le=MAX_EPOCHS,
                               description="epochs a trial runs before it can be pruned (successive halving: its "
                                           "first rung)")
    engine: Literal["optuna", "ray"] = Field(
        "optuna", description="who runs the trials: optuna, this repo's workers and populations (tune.workers, "
                              "tune.population); ray, Ray Tune on this machine or a Ray cluster (tune.ray_*), "
                              "its OptunaSearch proposing from the same study and ASHA stopping trials")
    ray_address: str | None = Field(None, description="tune.engine ray: the cluster (ray://host:10001, auto); "
                                                      "default RAY_ADDRESS, else a Ray started on this machine")
    resources: TrialResources = TrialResources()
    ray_max_failures: int = Field(2, ge=0, le=100, description="tune.engine ray: restarts of a trial whose worker "
                                                               "or node was lost, each from its last epoch's "
                                                               "checkpoint, before the trial fails")
    ray_storage: str | None = Field(None, description="tune.engine ray: where Ray keeps trial checkpoints; on a "
                                                      "cluster, a path every node shares (NFS) or s3://, gs://; "
                                                      "default ray_results/ in this repo")
    workers: int = Field(1, ge=1, le=256, description="worker processes on this machine (more machines: start "
                                                      "tune on each)")
    population: int = Field(16, ge=1, le=256, description="trials trained at once by each worker: those of the same "
                                                         "model widths and batch size in one forward pass; 1 = one "
                                                         "trial at a time")
    confirm: int = Field(3, ge=0, le=1000,
                         description="after the search, the best N distinct trials and the untuned settings' trial "
                                     "are retrained with `replicates` seeds; the best mean wins, and the untuned "
                                     "settings ship unless it beats them beyond the seeds' noise. 0: the best trial "
                                     "ships as it is")
    storage: str | None = Field(None, description="Optuna RDB URL (sqlite:///, postgresql://), a gRPC storage proxy "
                                                  "(grpc://host:port) or a journal file path; default "
                                                  "sqlite:///<repo>/optuna.db")
    lock: str | None = Field(None, description="grpc:// storage: the postgresql:// URL of the database behind the "
                                               "proxy, whose advisory lock keeps the study at exactly n_trials")
    heartbeat_interval: int = Field(10, ge=1, le=3600, description="seconds between heartbeats of running trials (RDB)")
    grace_period: int = Field(60, ge=2, le=7 * 86400,
                              description="a trial without heartbeat this long is stale: failed + retried")
    space: dict[str, SearchDimension] = Field(default_factory=dict, description="searched params by dotted key: "
                                                                            "{low, high, log?, step?} or {choices}")
    lr_from_finder: bool = Field(False, description="search train.lr a decade either side of the lr_find stage's "
                                                    "suggestion for model.name (log scale), whatever tune.space "
                                                    "says of it: the range test's coarse step, then the search")

    @property
    def direction(self) -> str:
        return DIRECTIONS[self.metric]

    @model_validator(mode="after")
    def _workers_are_the_optuna_engines(self) -> TuneConfig:
        if self.engine == "ray" and self.workers > 1:
            raise ValueError("tune.workers starts the optuna engine's worker processes; with tune.engine ray, Ray "
                             "places the trials itself: set tune.workers to 1 (and tune.resources.cpu)")
        return self


class Config(Section):
    seed: int = Field(42, ge=0, lt=2**32, description="seeds initialisation, data order, augmentation, dropout, "
                                                      "the search's sampler and the intervals' bootstrap (the split "
                                                      "has data.split_seed)")
    replicates: int = Field(3, ge=1, le=MAX_REPLICATES,
                            description="seeds (seed, seed+1, ...) every comparison model and the final one train "
                                        "with, together as one population; the best on validation ships, and the "
                                        "reports give each test metric's mean and std over them. 1: one run each")
    data: DataConfig = DataConfig()
    # Not called `models`: DVC confuses a param of that name with the models/ output folder.
    comparison: list[ModelName] = Field(["logreg", "mlp", "cnn"], min_length=1,
                                        description="models trained side by side (train@<model>)")
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    lr_find: LrFindConfig = LrFindConfig()

    @field_validator("comparison")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once (each model is trained once)")
        return names

    @model_validator(mode="after")
    def _backbone_lr_needs_a_backbone(self) -> Config:
        if self.train.backbone_lr is not None and self.model.weights is None:
            raise ValueError("train.backbone_lr needs model.weights (a pretrained backbone)")
        return self

    def for_model(self, name: str, source: str = "--model") -> Config:
        """This config for another model of the comparison (see `model_overrides`)."""
        return self.with_overrides(model_overrides(name), source=source)

    @model_validator(mode="after")
    def _searchable_space(self) -> Config:
        """Every searched key must exist, and the bounds/choices must be valid values for it."""
        if not self.tune.space:
            return self
        base = self.model_dump()
        base["tune"]["space"] = {}
        known = flatten(base)
        for key, dimension in self.tune.space.items():
            if key not in known or key.startswith(("tune.", "tracking.")) or key in ("seed", "replicates"):
                raise ValueError(f"tune.space: {key!r} is not a searchable param")
            if key in {f"train.{name}" for name in _SET_BY_SEARCH}:
                raise ValueError(f"tune.space: {key!r} is set by the search for every trial (tune.epochs, "
                                 "tune.metric, no resume): searching it would change nothing")
            for value in dimension.candidates():
                raw = json.loads(json.dumps(base))
                _set_dotted(raw, key, value)
                try:
                    Config.model_validate(raw)
                except ValidationError as err:
                    raise ValueError(f"tune.space.{key}: {value!r} is not a valid value for it "
                                     f"({err.errors()[0]['msg']})") from None
        return self

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> Config:
        """A new validated Config with dotted keys replaced (e.g. tuned values); `source` names them in errors."""
        raw = self.model_dump()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return validate(raw, source=source)

    @property
    def experiment(self) -> str:
        """The MLflow experiment (and TensorBoard folder) runs go to: tracking.experiment, default data.name."""
        return self.tracking.experiment or self.data.name

    def fingerprint(self) -> str:
        """Short stable hash of the params that shape one training run: names runs, keys resume points."""
        return self.digest(training_keys())

    def digest(self, keys: list[str]) -> str:
        """Short stable hash of the values of `keys` (dotted; a section counts whole)."""
        values = {key: self.value(key) for key in keys}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]

    def value(self, key: str) -> Any:
        node: Any = self.model_dump()
        for part in key.split("."):
            node = node[part]
        return node

    def subset(self, keys: list[str]) -> dict[str, Any]:
        """The values of dotted `keys` as a nested dict (what an output may depend on, and nothing else)."""
        tree: dict[str, Any] = {}
        for key in keys:
            _set_dotted(tree, key, self.value(key))
        return tree

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as `dvc exp run -S` and MLflow params spell them."""
        return flatten(self.model_dump())

    def public(self) -> dict[str, Any]:
        """The config as it may be shown or logged: credentials in store URLs masked."""
        return json.loads(redact(json.dumps(self.model_dump())))

    def public_yaml(self) -> str:
        """`public` as YAML, in params.yaml's order: the config a run logs (MLflow's config.yaml, TensorBoard's
        text)."""
        return yaml.safe_dump(self.public(), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _ParamsLoader(yaml.SafeLoader):
    """YAML as params need it: a repeated key is an error (not a silent last-one-wins), and no aliases
    (params never need them, and an alias bomb would expand into a huge config)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported in params",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_ParamsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _ParamsLoader.construct_mapping)
# YAML 1.1 (PyYAML) reads 1e-3 as a string, YAML 1.2 (what DVC writes with) as a number: params are typed
# strictly, so 1e-3 is a float here too, as everyone who types it means.
_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{source}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None


def model_overrides(name: str) -> dict[str, Any]:
    """What makes a config one of model `name`: its name, and, for a model without published weights, no
    pretrained settings (the comparison's models train from scratch, and their params say so)."""
    overrides: dict[str, Any] = {"model.name": name}
    if name not in get_args(PretrainedName):
        overrides.update({f"model.{key}": ModelConfig.model_fields[key].default for key in
                          ("weights", "weights_file", "weights_sha256", "freeze_backbone", "unfreeze_after")})
        overrides["train.backbone_lr"] = None
    return overrides


def load_config(path: str | Path = "params.yaml", overrides: list[str] = (), model: str | None = None) -> Config:
    """Read params.yaml, apply `key=value` overrides, validate. Raises UserError. `model` (a command line's
    --model) makes it that model's config before it is validated, so its own settings are judged for it."""
    path = Path(path)
    try:
        with path.open("rb") as stream:  # at most a bound's worth: /dev/zero or a runaway file never fills memory
            blob = stream.read(MAX_PARAMS_BYTES + 1)
        if len(blob) > MAX_PARAMS_BYTES:
            raise UserError(f"params file {path} is larger than {MAX_PARAMS_BYTES // 1024} KiB: a params file is a "
                            "few KiB of YAML; pass the right file with --params")
        text = blob.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"params file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"params file {path} is a directory: pass the YAML file, e.g. --params params.yaml") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read params file {path}: {err.strerror or err}") from None
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    sources = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
        _set_dotted(raw, key, parse_yaml(value, f"--set {key}") if value else None)
        sources[key] = f"--set {key}"
    if model is not None:
        for key, value in model_overrides(model).items():
            _set_dotted(raw, key, value)
            sources.setdefault(key, "--model")
    return validate(raw, source=str(path), sources=sources)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = _key_parts(key)
    node = tree
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set {key}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = value


def _key_parts(key: str) -> list[str]:
    """A dotted key's path through the params tree. tune.space's keys are dotted params themselves:
    tune.space.train.lr.low is ["tune", "space", "train.lr", "low"]."""
    head = "tune.space."
    if not key.startswith(head) or key == head:
        return key.split(".")
    searched, _, field = key.removeprefix(head).rpartition(".")
    if field in SearchDimension.model_fields and searched:
        return ["tune", "space", searched, field]
    return ["tune", "space", key.removeprefix(head)]


def validate(raw: dict[str, Any], source: str, sources: dict[str, str] | None = None) -> Config:
    """`sources`: dotted keys set elsewhere than `source` (e.g. by --set), so errors name where a value came from."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, source, sources or {})) from None


def describe_validation_error(err: ValidationError, source: str, sources: dict[str, str]) -> str:
    """The first problem as one line naming the dotted key and where it was set; a count of the rest."""
    problems = err.errors()
    first = problems[0]
    key = dotted(first["loc"])
    reason = first["msg"].removeprefix("Value error, ")
    for candidate, origin in sources.items():  # the override that set this key, a section above it or a part of it
        named = key or reason  # whole-config checks name their keys in the message
        if named == candidate or named.startswith((candidate + ".", candidate + "[", candidate + ":")) \
                or (key and candidate.startswith(key + ".")):
            source = origin
            break
    if first["type"] == "extra_forbidden":
        parent = _section_at(first["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        message = f"unknown key {key!r} (allowed here: {allowed})"
    else:
        # whole-config checks (loc == ()) name their keys in the message and have no single input to show
        message = f"{key}: {reason} (got {shorten(repr(first.get('input')))})" if key else reason
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


# ---------------------------------------------------------------- which params shape which result

# How a run proceeds, not what it produces: an exact resume gives the same result as no resume.
_RUNTIME_TRAIN = {"resume"}
# Set by the search for every trial, whatever train.* says (tune.epochs, tune.metric, no resume).
_SET_BY_SEARCH = {"epochs", "monitor", "resume"}
# Where and how a search runs, not which trials it runs. (A trial's threads follow tune.workers: another thread
# count sums in another order, which bf16 autocast shows at ~1e-3, but the study is the same.)
_RUNTIME_TUNE = {"workers", "storage", "lock", "heartbeat_interval", "grace_period", "ray_address",
                 "resources", "ray_max_failures", "ray_storage"}
_RUNTIME_TRIAL = {"threads"}
# How much of a search to run, and who schedules its trials: a bigger budget or another engine continues the same
# study. (A population trains its trials as they would train alone, but asks the sampler at other moments; Ray
# Tune asks at its own moments and stops trials by ASHA: other trials of the same study.)
_BUDGET_TUNE = {"n_trials", "timeout", "population", "engine"}
# What happens once the trials are done (the confirmation): the same study, another winner.
_AFTER_SEARCH_TUNE = {"confirm"}
# Where a space comes from, not the space: the study hashes the space it searches (stages/tune.py:lr_from_finder).
_SPACE_SOURCE_TUNE = {"lr_from_finder"}


def _section_keys(section: str, model: type[BaseModel], skip: set[str] = frozenset()) -> list[str]:
    return [f"{section}.{name}" for name in model.model_fields if name not in skip]


def training_keys() -> list[str]:
    """Params that shape one training run's result (with the prepared data and the code)."""
    return ["seed", "replicates", "data.augment", *_section_keys("model", ModelConfig),
            *_section_keys("train", TrainConfig, _RUNTIME_TRAIN)]


def study_keys() -> list[str]:
    """Params that define a search (its study name hashes these): change one and it is another study."""
    return ["seed", "data.augment", *_section_keys("model", ModelConfig),
            *_section_keys("train", TrainConfig, _SET_BY_SEARCH | _RUNTIME_TRIAL),
            *_section_keys("tune", TuneConfig, _RUNTIME_TUNE | _BUDGET_TUNE | _AFTER_SEARCH_TUNE | _SPACE_SOURCE_TUNE)]


def search_keys() -> list[str]:
    """Params that can change a search's outcome: the study's definition, where its space comes from, its budget,
    and its confirmation (with how many seeds)."""
    return [*study_keys(), *(f"tune.{name}" for name in TuneConfig.model_fields
                             if name in _SPACE_SOURCE_TUNE | _BUDGET_TUNE | _AFTER_SEARCH_TUNE), "replicates"]
