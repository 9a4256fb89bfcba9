"""The options the commands share (train's, and each one that several commands take), a YAML
config's values as their defaults (the timm pattern), and parsed arguments turned into typed
settings.

Every option is named after its setting (`--lr-max` sets `ScheduleSettings.lr_max`), so the
conversion is by name; `settings.IDENTITY` says which of them a resume may not change.
`parse_args(parser, argv)` reads `--config FILE` first, checks every key of the file against the
parser's options (unknown keys and wrong value types are errors naming the file and key), sets
them as defaults, then parses the command line, which wins.

Only light modules are imported here: a command answers --help and bad flags in well under a
second, before torch is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from leaf_xla.config import find_config, load_yaml
from leaf_xla.errors import UserError
from leaf_xla.formats import LABEL_FORMATS
from leaf_xla.metrics import METRIC_CHOICES
from leaf_xla.schedule import Schedule
from leaf_xla.settings import (
    COMPILE_ALLOWANCE,
    DEVICES,
    OPTIMIZERS,
    PARALLEL,
    PRECISIONS,
    Launch,
    TrainSettings,
    parse_image_size,
)
from leaf_xla.transforms import PRESETS, describe_preset


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Every option of `train` (and of each model of a recipe)."""
    add_config_option(parser)
    add_data_options(parser)
    add_loading_options(parser)
    add_model_options(parser)
    add_augment_options(parser)
    add_optim_options(parser)
    add_schedule_options(parser)
    add_launch_options(parser)
    add_run_options(parser)


def add_data_source_options(parser: Any, required: bool = False) -> None:
    """Where the competition's files are and how their labels read: every data command's."""
    parser.add_argument(
        "--data-dir", type=Path, required=required, help="competition folder (train.csv, images)"
    )
    parser.add_argument("--label-format", choices=LABEL_FORMATS, default="auto")
    parser.add_argument("--classes", nargs="+", help="class names (default: from the data)")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    add_data_source_options(data)
    data.add_argument("--out-dir", type=Path, default=Path("runs"), help="where runs are written")
    data.add_argument("--run-name", help="run folder name (default: <model>-fold<k>)")
    data.add_argument(
        "--folds-file",
        type=Path,
        help="folds CSV shared by the ensemble (default: <out-dir>/folds.csv)",
    )
    data.add_argument("--n-folds", type=int, default=5)
    data.add_argument("--fold", type=int, default=0, help="the fold used for validation")
    data.add_argument("--holdout", type=float, help="validate on this fraction instead of folds")
    data.add_argument("--fold-seed", type=int, default=42)
    data.add_argument(
        "--metric",
        choices=METRIC_CHOICES,
        default="auto",
        help="validation score that picks best.pt (see metrics.py); auto: the competition's, "
        "from the label format: auc (Plant Pathology 2020), f1_samples (2021), accuracy "
        "(Cassava, generic)",
    )
    data.add_argument(
        "--image-size",
        type=parse_image_size,
        help="input size: 512 (square) or HEIGHTxWIDTH, e.g. 512x768 for landscape photos "
        "(portrait ones are turned to landscape); default: the model's",
    )
    data.add_argument(
        "--soft-targets",
        type=Path,
        help="CSV of per-image training targets (image_id, one column per class) replacing "
        "the labels of the training images: distributions for single-label data, per-class "
        "probabilities for multi-label; validation AUC stays on the true labels",
    )


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("reading images")
    data.add_argument(
        "--cache",
        choices=("auto", "build", "off"),
        default="auto",
        help="resize cache (and images kept in RAM): filled by the first epoch that decodes "
        "each image / built for every image before training / never",
    )
    data.add_argument("--cache-dir", type=Path, help="default: <data-dir>/.leaf_xla_cache")
    data.add_argument("--workers", type=int, default=4, help="decoding threads per process")
    data.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="train on with a training image that cannot be decoded (masked out, listed at "
        "epoch end); validation and test images must still be readable",
    )
    data.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="with --skip-bad-images: stop when more of an epoch's images are unreadable",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="timm name or Keras alias (EfficientNetB7, ...)")
    model.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ImageNet weights from the Hugging Face hub (or its cache)",
    )
    model.add_argument("--pretrained-tag", help="timm weight tag, e.g. ns_jft_in1k")
    model.add_argument(
        "--weights",
        help="local .safetensors/.pth to start from (offline); a .pth is read with "
        "weights_only=True: tensors only, no pickled code runs",
    )
    model.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the head")
    model.add_argument("--drop-path-rate", type=float, help="stochastic depth (model default)")
    model.add_argument("--mean", type=float, nargs=3, help="normalisation mean (model default)")
    model.add_argument("--std", type=float, nargs=3, help="normalisation std (model default)")


def add_augment_options(parser: argparse.ArgumentParser) -> None:
    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    aug.add_argument("--vflip", type=float, default=0.5, help="vertical flip probability")
    aug.add_argument(
        "--augment-preset",
        choices=list(PRESETS),
        default="seed",
        help="transforms after the flips; "
        + "; ".join(f"{name}: {describe_preset(name)}" for name in PRESETS),
    )
    aug.add_argument(
        "--augment",
        type=yaml_value,
        default=[],
        help="more albumentations transforms after the preset's, a YAML list (see transforms.py)",
    )
    add_mix_options(aug)


def add_optim_options(parser: argparse.ArgumentParser) -> None:
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=16, help="per replica (TPU core)")
    opt.add_argument("--eval-batch-size", type=int, help="per replica (default: 2x batch size)")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    opt.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=3,
        help="a step with a non-finite loss or gradient changes nothing and is counted; stop "
        "after this many in a row",
    )
    opt.add_argument(
        "--ema-decay",
        type=float,
        metavar="D",
        help="also keep an exponential moving average of the weights, decay D per optimizer "
        "step (e.g. 0.999), evaluated every epoch: its best is best_ema.pt (default: off)",
    )

    opt.add_argument(
        "--lr-update",
        choices=("step", "epoch"),
        default="step",
        help="step: the schedule at every optimizer update; epoch: once per epoch, as the "
        "seed's Keras LearningRateScheduler does",
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("runtime")
    run.add_argument("--precision", choices=PRECISIONS, default="fp32")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--resume", action="store_true", help="continue from <run>/last.pt")
    run.add_argument(
        "--force-resume",
        action="store_true",
        help="resume although classes, image size, seed, optimizer, schedule, batch or folds "
        "differ from the saved run (recorded in config.resumes.yaml)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run folder (the old one is deleted once the new best.pt is "
        "saved, and put back if the new run fails before)",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also save last.pt every N steps within an epoch (0: epoch ends)",
    )
    run.add_argument("--patience", type=int, default=0, help="early stop after N flat epochs")
    run.add_argument("--log-every", type=int, default=20, help="steps between loss reports")


def add_mix_options(group: Any) -> None:
    group.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="mixup: blend pairs of images and their targets with a Beta(ALPHA, ALPHA) weight "
        "(timm's mixup_alpha; 0: off)",
    )
    group.add_argument(
        "--cutmix",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="CutMix: paste a box of the paired image, its area from Beta(ALPHA, ALPHA) "
        "(timm's cutmix_alpha; 0: off)",
    )
    group.add_argument(
        "--mix-prob",
        type=float,
        default=1.0,
        help="probability that a batch is mixed (timm's prob)",
    )
    group.add_argument(
        "--mixup-switch-prob",
        type=float,
        default=0.5,
        help="with --mixup and --cutmix: probability of CutMix for a mixed batch (timm's "
        "switch_prob)",
    )


def add_schedule_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning rate (the seed's warm-up / sustain / decay)")
    group.add_argument("--lr-start", type=float, default=1e-5)
    group.add_argument(
        "--lr",
        "--lr-max",
        dest="lr_max",
        type=float,
        default=5e-5,
        help="peak learning rate for one replica",
    )
    group.add_argument("--lr-min", type=float, default=1e-5)
    group.add_argument("--ramp-epochs", type=float, default=5)
    group.add_argument("--sustain-epochs", type=float, default=0)
    group.add_argument("--decay", type=float, default=0.8, help="per-epoch decay factor")
    group.add_argument(
        "--scale-lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="multiply the peak by the number of replicas, as the seed does",
    )


def add_launch_options(parser: Any) -> None:
    group = parser.add_argument_group("devices and replicas")
    group.add_argument("--device", choices=DEVICES, default="auto")
    group.add_argument(
        "--parallel",
        choices=PARALLEL,
        default="auto",
        help="spawn: a process per TPU core; spmd: a process per host, sharded batch; "
        "ddp: torch.distributed, a process per device (CPU or CUDA)",
    )
    group.add_argument("--nprocs", type=int, help="ddp: processes on this machine")
    group.add_argument("--nnodes", type=int, default=1, help="ddp: machines in the job")
    group.add_argument("--node-rank", type=int, default=0, help="ddp: this machine's index")
    group.add_argument("--master-addr", default="127.0.0.1", help="ddp: machine 0's address")
    group.add_argument("--master-port", type=int, help="ddp: its port (default: free / 29500)")
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="seconds a replica waits for the others; on XLA also the longest a step may take "
        f"(a step that compiles: {COMPILE_ALLOWANCE:.0f} s more) before the run stops",
    )
    group.add_argument(
        "--compile-cache",
        default="auto",
        help="XLA's persistent compilation cache: a folder, off, or auto (on a TPU "
        "<out-dir>/xla_cache, so that the folds of a model and a resumed run load its graphs "
        "instead of compiling them again; off elsewhere, as XLA:CPU cannot load them back)",
    )


def launch_settings(args: argparse.Namespace) -> Launch:
    return settings_of(Launch, args)


def launch_options(launch: Launch) -> list[str]:
    """The command-line form of `launch`, for the recipe's train and predict steps."""
    options = ["--device", launch.device, "--parallel", launch.parallel]
    if launch.nprocs:
        options += ["--nprocs", str(launch.nprocs)]
    if launch.nnodes > 1:
        options += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank)]
        options += ["--master-addr", launch.master_addr]
    if launch.master_port:
        options += ["--master-port", str(launch.master_port)]
    options += ["--compile-cache", launch.compile_cache]
    return options + ["--dist-timeout", str(launch.dist_timeout)]


def settings_of(kind: type, args: argparse.Namespace) -> Any:
    """A settings dataclass from the parsed options of the same names."""
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in vars(args).items() if k in names})


def train_settings(args: argparse.Namespace) -> TrainSettings:
    settings = TrainSettings.from_flat(vars(args))
    Schedule.of(settings.schedule)  # its values checked before anything heavy is imported
    return settings


def _check_value(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """Check one YAML value against the argparse option it sets; return it converted."""
    where = f"{path}: key {key!r}"
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction) or action.const in (True, False):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if getattr(action.type, "yaml_values", False):  # a type that reads lists too
        try:
            return action.type(value)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    if action.nargs in ("+", "*") and not isinstance(value, list):
        value = [value]
    values = value if isinstance(value, list) else [value]
    if action.nargs not in ("+", "*") and isinstance(value, list) and action.type is not yaml_value:
        raise UserError(f"{where} takes one value, got a list")
    converted = []
    for item in values:
        kind = action.type
        if kind in (int, float) and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise UserError(f"{where} must be a number, got {item!r}")
        if kind is int and isinstance(item, float) and not item.is_integer():
            raise UserError(f"{where} must be a whole number, got {item!r}")
        if kind in (int, float):
            item = kind(item)
        elif kind is yaml_value:
            pass
        elif not isinstance(item, (str, int, float)):
            raise UserError(f"{where} must be a string, got {item!r}")
        else:
            item = str(item)
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise UserError(f"{where} must be one of {choices}, got {item!r}")
        converted.append(item)
    return converted if isinstance(value, list) else converted[0]


def yaml_value(text: str) -> Any:
    """argparse type for structured options (lists, mappings) given on the command line as YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not valid YAML: {text!r} ({err})") from None


def apply_config(
    parser: argparse.ArgumentParser, path: Path, only_known_keys: bool = False
) -> dict[str, Any]:
    """Validate a YAML config against `parser` and set its values as the parser's defaults.

    `only_known_keys` skips the keys `parser` has no option for (a command that reads a part
    of another command's config), instead of calling them unknown.
    """
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    config = load_yaml(path)
    if "models" in config and "models" not in actions:
        raise UserError(
            f"{path} is an ensemble config (it lists models), not a training config: run it "
            f"with leaf-xla recipe --config {path}"
        )
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in actions and only_known_keys:
            continue
        if dest not in actions:
            close = difflib.get_close_matches(dest, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{path}: unknown key {key!r}{hint}; see --help for the options")
        values[dest] = _check_value(path, str(key), value, actions[dest])
    parser.set_defaults(**values)
    return values


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, only_known_keys: bool = False
) -> argparse.Namespace:
    """Parse `argv` with the values of `--config FILE` (if given) as defaults."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        apply_config(parser, find_config(known.config), only_known_keys)
    return parser.parse_args(argv)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="YAML file, or the name of a shipped config (leaf-xla configs), whose keys "
        "set option defaults",
    )
