"""A training run's settings, as typed values the library takes and a checkpoint records.

`fit(TrainSettings(...))` trains without a command line; `leaf_xla.commands.options` turns
flags and YAML into these (every field is named after its flag: `lr_max` is `--lr-max`).
Which settings make a run's identity (a `--resume` may not change them) is declared here, in
`IDENTITY`; every other one is in `NOT_IN_IDENTITY`, with why a resume may change it.

This module imports neither torch nor numpy: a command parses and checks its arguments before
paying for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaf_xla.errors import SettingError, UserError

DEVICES = ("auto", "xla", "cpu", "cuda")
PARALLEL = ("auto", "none", "spawn", "spmd", "ddp")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "adamw", "sgd")
MIN_SIZE = 8  # pixels per side of --image-size
# A first step's compilation of a big model takes minutes on a TPU host: how much longer the
# XLA watchdog waits for a step that compiles (backends.xla).
COMPILE_ALLOWANCE = 3600.0


def check_data_dir(path: Path | str) -> Path:
    """The competition folder, or a one-line error: before anything heavy is imported."""
    if not Path(path).is_dir():
        raise SettingError("data_dir", f"{path}: data directory not found")
    return Path(path)


@dataclass(frozen=True)
class DataSettings:
    data_dir: Path | None = None  # the competition folder (train.csv, images)
    out_dir: Path = Path("runs")
    run_name: str | None = None  # default: <model>-fold<fold>
    label_format: str = "auto"
    classes: list[str] | None = None  # default: from the data
    folds_file: Path | None = None  # default: <out_dir>/folds.csv
    n_folds: int = 5
    fold: int = 0
    holdout: float | None = None
    fold_seed: int = 42
    metric: str = "auto"  # auto: the label format's competition metric
    image_size: int | str | None = None  # 512, or "480x768" (height x width); None: the model's
    soft_targets: Path | None = None
    cache: str = "auto"
    cache_dir: Path | None = None
    workers: int = 4
    skip_bad_images: bool = False
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.image_size is not None:  # 512, "512" and [512, 512] are one size
            object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        if self.workers < 1:
            raise SettingError("workers", "must be at least 1")
        if not 0 <= self.max_bad_fraction < 1:
            raise SettingError("max_bad_fraction", f"{self.max_bad_fraction:g} must be in [0, 1)")


@dataclass(frozen=True)
class ModelSettings:
    model: str | None = None  # a timm name or a Keras alias
    pretrained: bool = True
    pretrained_tag: str | None = None
    weights: str | None = None  # a local .safetensors/.pth to start from
    drop_rate: float = 0.0
    drop_path_rate: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass(frozen=True)
class AugmentSettings:
    hflip: float = 0.5
    vflip: float = 0.5
    augment_preset: str = "seed"
    augment: list[Any] = field(default_factory=list)  # albumentations transforms, YAML form


@dataclass(frozen=True)
class MixSettings:
    """timm's Mixup arguments: mixup_alpha, cutmix_alpha, prob and switch_prob."""

    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mixup_switch_prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise SettingError(name, f"must be 0 (off) or more, got {getattr(self, name)}")
        for name in ("mix_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise SettingError(name, f"must be in [0, 1], got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0


@dataclass(frozen=True)
class OptimSettings:
    epochs: int = 20
    batch_size: int = 16  # per replica
    eval_batch_size: int | None = None  # per replica; default: 2x batch_size
    optimizer: str = "adam"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    max_nonfinite_steps: int = 3
    ema_decay: float | None = None
    lr_update: str = "step"  # the schedule at every optimizer step, or once per epoch

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise SettingError(name, "must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise SettingError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class ScheduleSettings:
    """The seed's warm-up / sustain / exponential decay (schedule.Schedule)."""

    lr_start: float = 1e-5
    lr_max: float = 5e-5  # for one replica
    lr_min: float = 1e-5
    ramp_epochs: float = 5
    sustain_epochs: float = 0
    decay: float = 0.8
    scale_lr: bool = True  # the peak times the replicas, as the seed does


@dataclass(frozen=True)
class Launch:
    """How the processes of a run are laid out: the settings every multi-replica command shares."""

    device: str = "auto"
    parallel: str = "auto"
    nprocs: int | None = None  # ddp: processes on this machine (default: its CUDA devices, or 1)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    dist_timeout: float = 600.0  # seconds a collective waits for a slow replica before failing
    compile_cache: str = "auto"  # XLA's persistent compilation cache: auto, off or a folder

    def __post_init__(self) -> None:
        for name in ("nprocs", "nnodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingError(name, "must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise SettingError(
                "node_rank", f"must be in 0..{self.nnodes - 1}, got {self.node_rank}"
            )


@dataclass(frozen=True)
class RunSettings:
    precision: str = "fp32"
    seed: int = 0
    resume: bool = False
    force_resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0  # also save last.pt every N steps (0: at epoch ends)
    patience: int = 0  # early stop after N epochs without a better score
    log_every: int = 20
    config: str | None = None  # the --config file the values came from, as recorded


@dataclass(frozen=True)
class TrainSettings:
    """Everything one training run (one model, one fold) is told."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    mix: MixSettings = field(default_factory=MixSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    launch: Launch = field(default_factory=Launch)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        if not self.model.model:
            raise UserError(
                "--model is required (a timm name or a Keras alias), or set it in --config"
            )
        if not self.data.data_dir:
            raise UserError("--data-dir is required, or set data_dir in --config")

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainSettings:
        """From one flat mapping of setting names (a parsed command line, a saved config)."""
        groups = {}
        for group in dataclasses.fields(cls):
            kind = group.default_factory  # the group's dataclass
            names = [f.name for f in dataclasses.fields(kind)]
            groups[group.name] = kind(**{k: values[k] for k in names if k in values})
        return cls(**groups)

    def flat(self) -> dict[str, Any]:
        """One mapping of every setting by name: what config.yaml and a checkpoint record."""
        return {k: v for group in self.groups() for k, v in dataclasses.asdict(group).items()}

    def groups(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def identity(self) -> dict[str, Any]:
        """The settings a resume may not change, by name."""
        return {k: v for k, v in self.flat().items() if k in IDENTITY}


# A resume that changes one of these is refused (unless --force-resume): they change what the
# run trains. The resolved classes and image size, the folds and the global batch are compared
# too (rundir.resume_identity).
IDENTITY = {
    *("classes", "fold", "image_size", "model", "drop_rate", "drop_path_rate", "mean", "std"),
    *("hflip", "vflip", "augment_preset", "augment"),
    *("mixup", "cutmix", "mix_prob", "mixup_switch_prob"),
    *("optimizer", "weight_decay", "label_smoothing", "ema_decay", "lr_update"),
    *("lr_start", "lr_max", "lr_min", "ramp_epochs", "sustain_epochs", "decay", "scale_lr"),
    *("precision", "seed"),
}
# Every other setting, with why a resume may change it.
NOT_IN_IDENTITY = {
    "config": "its values are the other settings'",
    "data_dir": "where the data is; its classes and folds are compared",
    "out_dir": "where the run is",
    "run_name": "where the run is",
    "metric": "which score picks best.pt; a resume under another one re-scores the history",
    "label_format": "how the labels are read; the classes are compared",
    "folds_file": "the digest of which images validate is compared",
    "n_folds": "the digest of which images validate is compared",
    "holdout": "the digest of which images validate is compared",
    "fold_seed": "the digest of which images validate is compared",
    "soft_targets": "the digest of the rows trained on is compared",
    "cache": "where the pixels come from, not which",
    "cache_dir": "where the pixels come from, not which",
    "workers": "decoding threads: the batches are the same",
    "skip_bad_images": "what stops the run, not what it trains",
    "max_bad_fraction": "what stops the run, not what it trains",
    "max_nonfinite_steps": "what stops the run, not what it trains",
    "pretrained": "the starting weights: a resume loads last.pt's",
    "pretrained_tag": "the starting weights: a resume loads last.pt's",
    "weights": "the starting weights: a resume loads last.pt's",
    "epochs": "how long: a resume may train on",
    "patience": "how long: a resume may train on",
    "batch_size": "the global batch (x replicas) is compared",
    "eval_batch_size": "evaluation covers every image once whatever its batch",
    "device": "where it runs; the global batch and precision are compared",
    "parallel": "where it runs; the global batch and precision are compared",
    "nprocs": "where it runs; the global batch and precision are compared",
    "nnodes": "where it runs; the global batch and precision are compared",
    "node_rank": "where it runs; the global batch and precision are compared",
    "master_addr": "where it runs; the global batch and precision are compared",
    "master_port": "where it runs; the global batch and precision are compared",
    "dist_timeout": "how long a replica waits",
    "compile_cache": "a cache of compiled graphs",
    "resume": "how this process starts",
    "force_resume": "how this process starts",
    "overwrite": "how this process starts",
    "checkpoint_every": "when state is saved, not what",
    "log_every": "what is printed",
}


ImageShape = tuple[int, int]  # (height, width)


def parse_image_size(value: int | str | Sequence[int]) -> int | str:
    """The canonical --image-size: 512 for a square, "480x768" (height x width) otherwise.

    Reads what the CLI and YAML give: 512, "512", "480x768", [480, 768]. A square stays a plain
    number, so its checkpoints, resume checks and cache folder are what they were.
    """
    if isinstance(value, (list, tuple)):
        sides = list(value) if len(value) == 2 else []  # [height, width]
    elif isinstance(value, int) and not isinstance(value, bool):
        sides = [value]
    else:
        text = str(value).strip().lower()
        try:
            sides = [int(side) for side in text.split("x")]
        except ValueError:
            sides = []
    if (
        len(sides) not in (1, 2)
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in sides)
        or min(sides) < MIN_SIZE
    ):
        raise UserError(
            f"--image-size {value!r}: expected SIZE or HEIGHTxWIDTH in pixels, at least "
            f"{MIN_SIZE} each (e.g. 512 or 512x768)"
        )
    height, width = sides[0], sides[-1]
    return height if height == width else f"{height}x{width}"


# commands/options.py: YAML's own values (a [height, width] list) go in as is.
parse_image_size.yaml_values = True  # type: ignore[attr-defined]


def image_shape(size: int | str | Sequence[int]) -> ImageShape:
    """(height, width) of an --image-size value."""
    value = parse_image_size(size)
    if isinstance(value, int):
        return value, value
    height, width = value.split("x")
    return int(height), int(width)
