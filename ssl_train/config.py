"""One typed config for one training run.

Every knob of a run lives here, grouped by concern. A YAML file, a search space and
``--set`` overrides all name fields by their dotted path (``optim.lr``,
``byol.tau_base``, ``augment.strength``). Values are checked on load, before any work
starts; an error names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ssl_train.data import uris
from ssl_train.data.group_by import GroupByError, parse_group_by


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


@dataclass
class BYOLConfig:
    """BYOL (Grill et al. 2020). Paper sizes: projector/predictor 4096 hidden, 256 out."""

    tau_base: float = 0.99
    projector_hidden_dim: int = 512
    projector_out_dim: int = 128
    predictor_hidden_dim: int = 512


@dataclass
class SwAVConfig:
    """SwAV (Caron et al. 2020). Paper: 3000 prototypes, 128-d, eps 0.05, 3 iterations."""

    projector_hidden_dim: int = 512
    projector_out_dim: int = 32
    num_prototypes: int = 100
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 20
    queue_length: int = 0
    queue_start_epoch: int = 15


@dataclass
class BackboneConfig:
    """The encoder f. ``small_image_stem`` swaps ResNet's 7x7/2 conv + max-pool for a 3x3/1 conv."""

    name: Literal["small_cnn", "resnet18", "resnet50"] = "small_cnn"
    small_image_stem: bool = True
    width: int = 32


@dataclass
class OptimConfig:
    """Optimisation. ``batch_size`` is global: it does not change with the worker count."""

    optimizer: Literal["sgd", "lars", "adamw"] = "adamw"
    lr: float = 2e-3
    scale_lr_by_batch: bool = False
    batch_size: int = 64
    epochs: int = 20
    warmup_epochs: int = 2
    warmup_start_lr: float = 0.0  # the lr the warm-up starts from (SwAV: 0.3 for a 4.8 base)
    final_lr: float = 0.0  # the lr the cosine decays to (SwAV: 0.0048)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    exclude_bias_and_norm: bool = True
    mixed_precision: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (see loop.uses_bf16)
    channels_last: bool = True  # NHWC activations: 1.2x a CPU step, 1.8x with bf16 (bench/throughput.py)
    compile: bool = False  # torch.compile the method's forward: faster steps after minutes of compiling


@dataclass
class AugmentConfig:
    """Augmentations. ``strength`` 0 is crop + flip only, 1 the paper's recipe, up to 2.

    A per-op field left at ``None`` follows ``strength``; a number sets that op on its own.
    Two-element lists are (view 1, view 2), as BYOL's asymmetric views.
    """

    strength: float = 1.0
    # batched: each batch's views drawn at once on the training device (augment_batched.py);
    # per_sample: torchvision v2 per image in the DataLoader (augment.py), the reference.
    backend: Literal["batched", "per_sample"] = "batched"
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_p: float = 0.5
    jitter_p: Optional[float] = None
    brightness: Optional[float] = None
    contrast: Optional[float] = None
    saturation: Optional[float] = None
    hue: Optional[float] = None
    grayscale_p: Optional[float] = None
    blur_p: Optional[list[float]] = None
    solarize_p: Optional[list[float]] = None
    num_local_crops: int = 0
    local_crop_size: Optional[int] = None
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])


@dataclass
class DataConfig:
    """Where images come from. ``source``: digits | mnist5k | folder | parquet | cifar10 | stl10."""

    source: Literal["digits", "mnist5k", "folder", "parquet", "cifar10", "stl10"] = "digits"
    path: Optional[str] = None
    labeled_path: Optional[str] = None
    image_size: int = 32
    test_fraction: float = 0.3  # of the labeled images: read only once a run has finished
    val_fraction: float = 0.2  # of the labeled non-test images: the search's per-epoch objective
    labeled_fraction: float = 1.0
    download_root: str = "~/.cache/ssl-tune/datasets"
    loader_workers: int = 0  # DataLoader processes of augment.backend=per_sample
    # Stream the SSL-train images of a parquet data.path to the workers with Ray Data instead of
    # decoding all of them in every worker (labeled sets from data.labeled_path stay in memory).
    streaming: bool = False
    # What ties images together (level:N, regex:PATTERN or column:NAME; ssl_train/data/group_by.py): the splits keep
    # each group in one split. None: each image is its own group.
    group_by: Optional[str] = None
    # Count the val/test images with a near-copy among the training images (ssl_train/data/leaks.py).
    leak_check: bool = True


@dataclass
class EvalConfig:
    """kNN monitor (Wu et al. 2018) and linear probe on frozen backbone features.

    A run whose embedding std (x sqrt(d); 1 = spread, 0 = collapsed) is below
    ``collapse_threshold`` after ``collapse_grace_epochs`` stops as ``collapsed`` (0 = never).
    """

    # k=20 clipped to the smallest class's eval-train count (evaluate.fitted_knn_k); T=0.07 as in DINO.
    # k=200, T=0.1 is the ImageNet-scale protocol (~1,300 labeled images a class).
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_probe: bool = False
    # SelfAugment's rotation probe on val (evaluation/rotation.py): 4 rotations of up to 512 images per evaluation.
    rotation_probe: bool = False
    every_epochs: int = 1
    # Evaluate the test split once, after the last epoch. Search trials set it false: they select on val
    # and must never see test; confirmation runs and `ssl-tune train` keep it.
    test_at_end: bool = True
    collapse_threshold: float = 0.0
    collapse_grace_epochs: int = 2


@dataclass
class ScalingConfig:
    """Workers and fault tolerance. ``min_workers < max_workers`` makes the run elastic."""

    min_workers: int = 1
    max_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    sync_batchnorm: bool = False
    storage: Optional[str] = None
    resize_interval_s: float = 60.0


# What a schedule may change between epochs, with no model, data or optimiser to rebuild: the augmentations'
# probabilities and magnitudes, the lr, BYOL's tau, SwAV's epsilon and temperature.
SCHEDULABLE_KEYS = frozenset({"optim.lr", "byol.tau_base", "swav.epsilon", "swav.temperature"})
FIXED_FOR_A_RUN = frozenset({"augment.backend", "augment.num_local_crops", "augment.local_crop_size"})


def schedulable(key: str) -> bool:
    """Whether ``key`` may change between epochs of a run (``schedule:``; a PBT search's knobs)."""
    return key in SCHEDULABLE_KEYS or (key.startswith("augment.") and key not in FIXED_FOR_A_RUN)


@dataclass
class ScheduleStep:
    """From epoch ``epoch`` on (after that many epochs), the dotted values in ``set`` replace the run's own."""

    epoch: int
    set: dict[str, Any]


@dataclass
class TrainConfig:
    """Everything that defines one training run; ``schedule`` changes some of it between epochs (a learned
    augmentation schedule, as Population Based Augmentation finds: Ho et al. 2019)."""

    method: Literal["byol", "swav"] = "byol"
    seed: int = 0
    output_dir: str = "runs/train"
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    schedule: list[ScheduleStep] = field(default_factory=list)

    def at_epoch(self, epoch: int) -> TrainConfig:
        """The values that train epoch ``epoch`` (0-based): every schedule step with ``step.epoch <= epoch`` applied
        in order; the schedule itself is kept."""
        tree = self.to_dict()
        for step in self.schedule:
            if step.epoch <= epoch:
                for key, value in step.set.items():
                    _set_dotted(tree, key, value)
        return from_dict(tree)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """The config as ``{dotted.key: value}`` (what MLflow logs as params)."""
        return flatten(self.to_dict())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def replace(self, overrides: dict[str, Any]) -> TrainConfig:
        """A new config with ``{dotted.key: value}`` overrides applied and validated."""
        tree = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(tree, key, value)
        return from_dict(tree)

    def with_absolute_paths(self) -> TrainConfig:
        """This config with ``data.path``, ``data.labeled_path`` and ``scaling.storage`` absolute (URIs stay as
        they are): processes that start in other directories (Ray Train workers, Ray Data tasks, Tune
        trials) then read the same files."""
        paths = {f"data.{key}": uris.absolute(value)
                 for key in ("path", "labeled_path") if (value := getattr(self.data, key))}
        if self.scaling.storage:
            paths["scaling.storage"] = uris.absolute(self.scaling.storage)
        return self.replace(paths)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise ConfigError(
                f"unknown config key '{dotted}': '{'.'.join(parents[: i + 1])}' is not a section; "
                f"sections are {sorted(k for k, v in tree.items() if isinstance(v, dict))}"
            )
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"unknown config key '{dotted}'; allowed keys there: {sorted(node)}")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=0.05'`` -> ``('optim.lr', 0.05)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({getattr(error, 'problem', error)}); "
                          "quote it or fix it, e.g. augment.crop_scale=[0.2,1.0]") from None


# ---------------------------------------------------------------- typed construction


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field's type (ints widen to floats)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list of {args[0].__name__}")
        if dataclasses.is_dataclass(args[0]):
            return [v if isinstance(v, args[0]) else _build(args[0], v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}={value!r} must map dotted config keys to values, e.g. {{optim.lr: 0.001}}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _build(cls: type, tree: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(tree, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys to values, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys in '{where}': {sorted(names)}"
        )
    kwargs = {}
    for name in tree:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, tree[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tree[name], hint, f"{prefix}{name}")
    return cls(**kwargs)


def from_dict(tree: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from a nested dict (missing keys keep their defaults)."""
    config = _build(TrainConfig, tree or {}, "")
    validate(config)
    return config


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Load a YAML config (or the defaults) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file '{path}' is not a YAML text file (byte {error.start} is not UTF-8 "
                              "text)") from None
    if isinstance(overrides, list):
        overrides = dict(parse_override(text) for text in overrides)
    try:
        config = from_dict(tree)
        return config.replace(overrides) if overrides else config
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None


# ---------------------------------------------------------------- value checks


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; {allowed}")


def _check_range_pair(key: str, pair: list[float], low: float, high: float) -> None:
    _require(len(pair) == 2, key, pair, "give two numbers [low, high]")
    _require(low <= pair[0] <= pair[1] <= high, key, pair, f"need {low} <= low <= high <= {high}")


def _check_probability(key: str, value: float | list[float] | None, views: int = 1) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list):
        _require(len(values) == views, key, value, f"give {views} probabilities, one per view")
    _require(all(0.0 <= v <= 1.0 for v in values), key, value, "probabilities lie in [0, 1]")


def min_image_size(backbone: BackboneConfig) -> int:
    """The smallest input side the backbone's downsampling leaves at least 1x1 of."""
    if backbone.name == "small_cnn":
        return 8
    return 8 if backbone.small_image_stem else 32


def validate(c: TrainConfig) -> None:
    """Cross-field and range checks; raises ConfigError naming key, value and what is allowed."""
    for key, value in c.flat().items():  # .inf and .nan are YAML floats; no field takes them
        _require(all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])
                     if isinstance(v, float)), key, value, "must be a finite number")
    _require(c.seed >= 0, "seed", c.seed, "use a non-negative integer")
    _validate_methods(c)
    _validate_backbone(c)
    _validate_optim(c)
    _validate_augment(c)
    _validate_data(c)
    _validate_eval(c)
    _validate_scaling(c)
    _validate_schedule(c)


def _validate_schedule(c: TrainConfig) -> None:
    """Each step after the last, inside the run's epochs, changing only schedulable keys to values the config
    takes (checked on the values of that epoch, without the schedule: the check does not recurse)."""
    values, last, known = dataclasses.replace(c, schedule=[]), 0, c.flat()
    for i, step in enumerate(c.schedule):
        where = f"schedule[{i}]"
        _require(last < step.epoch < c.optim.epochs, f"{where}.epoch", step.epoch,
                 f"steps go in increasing epochs, each in [1, optim.epochs - 1 = {c.optim.epochs - 1}]")
        fixed = [key for key in step.set if key in known and not schedulable(key)]  # unknown: replace says so
        _require(not fixed, f"{where}.set", step.set,
                 f"'{fixed[0] if fixed else ''}' cannot change mid-run; a schedule changes the augment.* ops, "
                 f"{', '.join(sorted(SCHEDULABLE_KEYS))}")
        try:
            values = values.replace(step.set)
        except ConfigError as error:
            raise ConfigError(f"{where} (from epoch {step.epoch}): {error}") from None
        last = step.epoch


def _validate_methods(c: TrainConfig) -> None:
    """The checks of byol and swav."""
    b, s = c.byol, c.swav
    _require(0.0 <= b.tau_base <= 1.0, "byol.tau_base", b.tau_base, "must lie in [0, 1] (paper: 0.996)")
    for key in ("projector_hidden_dim", "projector_out_dim", "predictor_hidden_dim"):
        _require(getattr(b, key) > 0, f"byol.{key}", getattr(b, key), "must be a positive integer")
    for key in ("projector_hidden_dim", "projector_out_dim", "num_prototypes", "sinkhorn_iterations"):
        _require(getattr(s, key) > 0, f"swav.{key}", getattr(s, key), "must be a positive integer")
    _require(s.temperature > 0, "swav.temperature", s.temperature, "must be > 0 (paper: 0.1)")
    _require(s.epsilon > 0, "swav.epsilon", s.epsilon, "must be > 0 (paper: 0.05)")
    _require(s.freeze_prototypes_steps >= 0, "swav.freeze_prototypes_steps", s.freeze_prototypes_steps, "must be >= 0")
    _require(s.queue_length >= 0, "swav.queue_length", s.queue_length, "must be >= 0 (0 turns the queue off)")
    _require(s.queue_start_epoch >= 0, "swav.queue_start_epoch", s.queue_start_epoch, "must be >= 0")


def _validate_backbone(c: TrainConfig) -> None:
    """The checks of backbone."""
    _require(c.backbone.width > 0, "backbone.width", c.backbone.width, "must be a positive integer")


def _validate_optim(c: TrainConfig) -> None:
    """The checks of optim."""
    o = c.optim
    _require(o.lr > 0, "optim.lr", o.lr, "the learning rate must be > 0")
    _require(o.batch_size >= 2, "optim.batch_size", o.batch_size, "must be >= 2 (BatchNorm needs 2 samples)")
    _require(o.epochs >= 1, "optim.epochs", o.epochs, "must be >= 1")
    _require(o.warmup_start_lr >= 0, "optim.warmup_start_lr", o.warmup_start_lr, "must be >= 0 (an lr)")
    _require(o.final_lr >= 0, "optim.final_lr", o.final_lr, "must be >= 0 (an lr)")
    _require(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", o.warmup_epochs,
             f"must lie in [0, optim.epochs={o.epochs}]")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must lie in [0, 1)")


def _validate_augment(c: TrainConfig) -> None:
    """The checks of augment."""
    a = c.augment
    _require(0.0 <= a.strength <= 2.0, "augment.strength", a.strength, "must lie in [0, 2] (0: crop+flip, 1: paper)")
    _check_range_pair("augment.crop_scale", a.crop_scale, 0.0, 1.0)
    _require(a.crop_scale[0] > 0, "augment.crop_scale", a.crop_scale, "the low end must be > 0")
    _check_range_pair("augment.crop_ratio", a.crop_ratio, 1e-3, 1e3)
    _check_range_pair("augment.global_crop_scale", a.global_crop_scale, 1e-3, 1.0)
    _check_range_pair("augment.local_crop_scale", a.local_crop_scale, 1e-3, 1.0)
    for key in ("flip_p", "jitter_p", "grayscale_p"):
        _check_probability(f"augment.{key}", getattr(a, key))
    for key in ("blur_p", "solarize_p"):
        _check_probability(f"augment.{key}", getattr(a, key), views=2)
    for key in ("brightness", "contrast", "saturation"):
        value = getattr(a, key)
        _require(value is None or value >= 0, f"augment.{key}", value, "must be >= 0")
    _require(a.hue is None or 0 <= a.hue <= 0.5, "augment.hue", a.hue, "must lie in [0, 0.5]")
    _require(a.num_local_crops >= 0, "augment.num_local_crops", a.num_local_crops, "must be >= 0")


def _validate_data(c: TrainConfig) -> None:
    """The checks of data (and the crop sizes that depend on the image size)."""
    d = c.data
    a, smallest = c.augment, min_image_size(c.backbone)
    _require(d.image_size >= smallest, "data.image_size", d.image_size,
             f"backbone '{c.backbone.name}' (small_image_stem={c.backbone.small_image_stem}) needs >= {smallest}")
    if a.local_crop_size is not None:
        _require(smallest <= a.local_crop_size <= d.image_size, "augment.local_crop_size", a.local_crop_size,
                 f"must lie in [{smallest}, data.image_size={d.image_size}]")
    _require(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must lie in (0, 1)")
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must lie in (0, 1)")
    _require(0 < d.labeled_fraction <= 1, "data.labeled_fraction", d.labeled_fraction, "must lie in (0, 1]")
    _require(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, "must be >= 0")
    _require(d.loader_workers == 0 or a.backend == "per_sample", "data.loader_workers", d.loader_workers,
             "runs augment.backend=per_sample's DataLoader; the batched backend augments on the training device "
             "without loader processes: set data.loader_workers=0, or augment.backend=per_sample")
    for key, location in (("data.path", d.path), ("data.labeled_path", d.labeled_path),
                          ("scaling.storage", c.scaling.storage)):
        if location:
            try:
                uris.check(location, key)
            except uris.LocationError as error:
                raise ConfigError(str(error)) from None
    if d.source in ("folder", "parquet"):
        _require(bool(d.path), "data.path", d.path, f"data.source={d.source!r} needs data.path")
    if d.group_by is not None:
        _check_group_by(d)
    if d.streaming:
        _require(d.source == "parquet", "data.source", d.source,
                 "data.streaming=true streams parquet: set data.source=parquet "
                 "(`ssl-tune data to-parquet` converts a folder or the digits), or data.streaming=false")
        _require(bool(d.labeled_path), "data.labeled_path", d.labeled_path,
                 "data.streaming=true needs the labeled evaluation images apart: set data.labeled_path "
                 "(a labeled parquet file or class folder, kept in memory)")


def _validate_eval(c: TrainConfig) -> None:
    """The checks of eval."""
    e = c.eval
    _require(e.knn_k >= 1, "eval.knn_k", e.knn_k, "must be >= 1")
    _require(e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature, "must be > 0")
    _require(e.every_epochs >= 1, "eval.every_epochs", e.every_epochs, "must be >= 1")
    _require(0 <= e.collapse_threshold < 1, "eval.collapse_threshold", e.collapse_threshold, "must lie in [0, 1)")
    _require(e.collapse_grace_epochs >= 0, "eval.collapse_grace_epochs", e.collapse_grace_epochs, "must be >= 0")


def _validate_scaling(c: TrainConfig) -> None:
    """The checks of scaling."""
    sc = c.scaling
    _require(sc.min_workers >= 1, "scaling.min_workers", sc.min_workers, "must be >= 1")
    _require(sc.max_workers >= sc.min_workers, "scaling.max_workers", sc.max_workers,
             f"must be >= scaling.min_workers={sc.min_workers}")
    _require(sc.max_failures >= -1, "scaling.max_failures", sc.max_failures, "must be >= 0, or -1 for unlimited")
    _require(sc.cpus_per_worker > 0, "scaling.cpus_per_worker", sc.cpus_per_worker, "must be > 0")
    _require(sc.resize_interval_s > 0, "scaling.resize_interval_s", sc.resize_interval_s, "must be > 0 seconds")
    _require(sc.gpus_per_worker > 0, "scaling.gpus_per_worker", sc.gpus_per_worker, "must be > 0")


def _check_group_by(d: DataConfig) -> None:
    _require(d.source in ("folder", "parquet"), "data.group_by", d.group_by,
             f"groups are read from folders and Parquet; data.source={d.source!r} has independent images "
             "(each its own group): leave data.group_by unset")
    _require(not d.streaming, "data.group_by", d.group_by,
             "grouped splits need the SSL-train images in memory: set data.streaming=false")
    try:
        spec = parse_group_by(d.group_by or "")
    except GroupByError as error:
        raise ConfigError(f"data.group_by={d.group_by!r} is invalid; {error}") from None
    _require(spec.kind != "column" or d.source == "parquet", "data.group_by", d.group_by,
             "column:NAME reads a Parquet column; for an image folder use level:N or regex:PATTERN")


def check_batch_fits(config: TrainConfig, num_train_images: int) -> None:
    """The global batch must not exceed the SSL training set (checked once data is known)."""
    if num_train_images < 2:
        raise ConfigError(f"the SSL training set has {num_train_images} image(s); training needs at least 2 (a "
                          "batch of >= 2: BatchNorm needs 2 samples): add images to data.path")
    _require(config.optim.batch_size <= num_train_images, "optim.batch_size", config.optim.batch_size,
             f"the SSL training set has only {num_train_images} images; use a batch size <= that")


def check_at_least(holder: Any, least: dict[str, int]) -> None:
    """Command-line counts (``holder.trials``, ...) that are set must reach their minimum:
    ``--trials 0 is invalid; it must be >= 1``."""
    for name, minimum in least.items():
        value = getattr(holder, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} {value} is invalid; it must be >= {minimum}")
