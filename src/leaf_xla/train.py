"""Train one model on one fold; everything a later resume, prediction or ensemble needs lands in
the run directory.

    python -m leaf_xla.train --model tf_efficientnet_b7 --config configs/tf_efficientnet_b7.yaml \\
        --data-dir data/plant-pathology-2020-fgvc7 --out-dir runs

Run directory (<out-dir>/<model>-fold<k>): best.pt, last.pt (and last.prev.pt, the one before),
config.yaml (config.resumes.yaml: what each resume changed), history.csv, oof.csv, tb/
(TensorBoard), plots/*.png. `--resume` continues from last.pt after a kill or preemption.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from leaf_xla import checkpoint, folds, mix, rundir, runtime, soft_targets
from leaf_xla.cli import ArgumentParser, UserError
from leaf_xla.config import add_config_option, identity, parse_args, save_config, yaml_value
from leaf_xla.data import (
    LABEL_FORMATS,
    DataSet,
    Problems,
    image_shape,
    parse_image_size,
    print_warnings,
    scan,
)
from leaf_xla.ema import check_decay
from leaf_xla.engine import Trainer, create_optimizer
from leaf_xla.files import atomic_to_csv
from leaf_xla.loader import (
    BatchLoader,
    LeafImages,
    ResizeCache,
    default_cache_root,
    eval_batches,
    train_batches,
)
from leaf_xla.metrics import METRIC_CHOICES, Metric, best_threshold, column_auc, resolve
from leaf_xla.models import ModelSpec, create_model, data_config, default_image_size
from leaf_xla.schedule import Schedule, add_schedule_options, from_args
from leaf_xla.transforms import PRESETS, create_transform, describe_preset

if TYPE_CHECKING:
    import albumentations


def build_parser(
    prog: str = "python -m leaf_xla.train", description: str | None = None
) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description=description or __doc__.split("\n\n")[0],
    )
    add_config_option(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, help="competition folder (train.csv, images)")
    data.add_argument("--out-dir", type=Path, default=Path("runs"), help="where runs are written")
    data.add_argument("--run-name", help="run folder name (default: <model>-fold<k>)")
    data.add_argument("--label-format", choices=LABEL_FORMATS, default="auto")
    identity(data, "--classes", nargs="+", help="class names (default: from the data)")
    data.add_argument(
        "--folds-file",
        type=Path,
        help="folds CSV shared by the ensemble (default: <out-dir>/folds.csv)",
    )
    data.add_argument("--n-folds", type=int, default=5)
    identity(data, "--fold", type=int, default=0, help="the fold used for validation")
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
    identity(
        data,
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

    model = parser.add_argument_group("model")
    identity(model, "--model", help="timm name or Keras alias (EfficientNetB7, ...)")
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
    identity(model, "--drop-rate", type=float, default=0.0, help="dropout before the head")
    identity(model, "--drop-path-rate", type=float, help="stochastic depth (model default)")
    identity(model, "--mean", type=float, nargs=3, help="normalisation mean (model default)")
    identity(model, "--std", type=float, nargs=3, help="normalisation std (model default)")

    aug = parser.add_argument_group("augmentation")
    identity(aug, "--hflip", type=float, default=0.5, help="horizontal flip probability")
    identity(aug, "--vflip", type=float, default=0.5, help="vertical flip probability")
    identity(
        aug,
        "--augment-preset",
        choices=list(PRESETS),
        default="seed",
        help="transforms after the flips; "
        + "; ".join(f"{name}: {describe_preset(name)}" for name in PRESETS),
    )
    identity(
        aug,
        "--augment",
        type=yaml_value,
        default=[],
        help="more albumentations transforms after the preset's, a YAML list (see transforms.py)",
    )
    mix.add_mix_options(aug)

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=16, help="per replica (TPU core)")
    opt.add_argument("--eval-batch-size", type=int, help="per replica (default: 2x batch size)")
    identity(opt, "--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    identity(opt, "--weight-decay", type=float, default=0.0)
    identity(opt, "--label-smoothing", type=float, default=0.0)
    opt.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=3,
        help="a step with a non-finite loss or gradient changes nothing and is counted; stop "
        "after this many in a row",
    )
    identity(
        opt,
        "--ema-decay",
        type=float,
        metavar="D",
        help="also keep an exponential moving average of the weights, decay D per optimizer "
        "step (e.g. 0.999), evaluated every epoch: its best is best_ema.pt (default: off)",
    )
    add_schedule_options(parser)

    identity(
        opt,
        "--lr-update",
        choices=("step", "epoch"),
        default="step",
        help="step: the schedule at every optimizer update; epoch: once per epoch, as the "
        "seed's Keras LearningRateScheduler does",
    )

    runtime.add_launch_options(parser)
    run = parser.add_argument_group("runtime")
    identity(run, "--precision", choices=runtime.PRECISIONS, default="fp32")
    identity(run, "--seed", type=int, default=0)
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
    return parser


@dataclass
class Plan:
    """What is settled once per host before any replica starts (and what it passes them)."""

    args: argparse.Namespace
    data: DataSet
    train_index: np.ndarray
    val_index: np.ndarray
    train_targets: np.ndarray  # (len(train_index), C): the labels, or the --soft-targets rows
    soft_digest: str | None  # digest of the --soft-targets rows trained on
    run_dir: Path
    image_size: int | str  # 512, or "480x768" (height x width)
    cache_root: Path | None
    layout: runtime.Launch
    metric: Metric  # picks best.pt and heads history.csv


def train_transform(args: argparse.Namespace, image_size: int | str) -> albumentations.Compose:
    height, width = image_shape(image_size)
    return create_transform(
        hflip=args.hflip,
        vflip=args.vflip,
        augment=args.augment,
        preset=args.augment_preset,
        square=height == width,
    )


def prepare(args: argparse.Namespace) -> Plan:
    """Checks, folds, cache and run folder: fail here, before any compilation."""
    if not args.model:
        raise UserError("--model is required (a timm name or a Keras alias), or set it in --config")
    if not args.data_dir:
        raise UserError("--data-dir is required, or set data_dir in --config")
    for name in ("epochs", "batch_size", "workers", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.max_bad_fraction < 1:
        raise UserError(f"--max-bad-fraction {args.max_bad_fraction:g} must be in [0, 1)")
    from leaf_xla.models import resolve_name

    resolve_name(args.model)
    from_args(args)  # schedule values checked now, not after compiling
    image_size = args.image_size or default_image_size(args.model)
    train_transform(args, image_size)  # a bad --augment or --augment-preset fails here
    mix.mix_from_args(args)
    check_decay(args.ema_decay)
    layout = runtime.launch_from_args(args)
    data, problems = scan(args.data_dir, args.label_format, args.classes)
    unreadable = {}  # training images that --skip-bad-images will skip: checked once folds exist
    if args.skip_bad_images and data is not None:
        unreadable = problems.take_file_errors(data.train.paths)
    if data is not None:
        warn_unreadable_test_images(problems.take_file_errors(data.test.paths), data)
    problems.raise_if_any(str(args.data_dir), args.data_dir)
    metric = resolve(args.metric, data.label_format, data.multilabel)
    from leaf_xla.check import submission_lines

    submission_lines(data)  # a sample_submission.csv that ensemble would refuse stops here
    folds_file = args.folds_file or args.out_dir / "folds.csv"
    fold_of = folds.load_or_create(
        folds_file, data.train.ids, data.train.targets, args.n_folds, args.fold_seed, args.holdout
    )
    if args.fold not in set(fold_of.tolist()) or args.fold < 0:
        raise UserError(f"--fold {args.fold}: {folds_file} has folds 0..{fold_of.max()}")

    cache_root = None
    if args.cache != "off":
        cache_root = args.cache_dir or default_cache_root(data.data_dir)
    val_index = np.flatnonzero(fold_of == args.fold)
    train_index = np.flatnonzero(fold_of != args.fold)
    if args.cache == "build":
        cache = ResizeCache(cache_root, image_size)
        problems = Problems()
        readable = [p for p in data.train.paths if p not in unreadable]
        built = cache.build(readable, args.workers, problems)
        if args.skip_bad_images:
            unreadable |= problems.take_file_errors(readable)
        problems.raise_if_any(
            f"{data.data_dir} (while building the {image_size}px cache)", data.data_dir
        )
        data.warnings.extend(problems.warnings)
        if built:
            print(f"cache: {built} image(s) resized into {cache.dir}")
    if unreadable:
        check_unreadable(unreadable, data, val_index, len(train_index), args.max_bad_fraction)
    print_warnings(data)
    for warning in setting_warnings(args, image_size):
        print(f"warning: {warning}", file=sys.stderr)

    train_targets, soft_digest = data.train.targets[train_index], None
    if args.soft_targets:
        train_ids = [data.train.ids[i] for i in train_index]
        soft = soft_targets.read_soft_targets(
            args.soft_targets,
            train_ids=data.train.ids,
            needed=train_ids,
            classes=data.classes,
            multilabel=data.multilabel,
        )
        train_targets = soft.loc[train_ids].to_numpy(np.float32)
        soft_digest = soft_targets.digest(soft, train_ids)
    run_dir = args.out_dir / rundir.check_name(args.run_name or f"{args.model}-fold{args.fold}")
    rundir.lock_run(run_dir)  # until this process ends: no other run touches the folder
    rundir.recover_overwrite(run_dir, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        if not any((run_dir / name).is_file() for name in ("last.pt", "last.prev.pt")):
            raise UserError(f"--resume: {run_dir / 'last.pt'} not found")
        identity = rundir.resume_identity(
            args,
            classes=data.classes,
            image_size=image_size,
            fold_digest=rundir.fold_digest(data.train.ids, val_index),
            soft_targets=soft_digest,
        )
        rundir.prepare_resume(run_dir, args, identity)
        rundir.remove_stale_temps(run_dir)  # safe: the lock says no live run writes them
    elif run_dir.exists() and any(run_dir.glob("*.pt")):
        if not args.overwrite:
            raise UserError(
                f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                "--overwrite to start again, or another --run-name"
            )
        rundir.Overwrite(run_dir).begin()  # the old run is deleted once best.pt is saved
    run_dir.mkdir(parents=True, exist_ok=True)
    return Plan(
        args=args,
        data=data,
        train_index=train_index,
        val_index=val_index,
        train_targets=train_targets,
        soft_digest=soft_digest,
        run_dir=run_dir,
        image_size=image_size,
        cache_root=cache_root,
        layout=layout,
        metric=metric,
    )


@dataclass
class RunState:
    """Where the run stands: what every checkpoint saves and a resume restores (with the
    weights, the optimizer and the RNG states)."""

    epoch: int = 0  # the epoch in progress
    step: int = 0  # steps of `epoch` done
    epoch_loss_sum: float = 0.0  # their summed loss, for the epoch's history row
    # Also of those steps: so that a resumed epoch counts and stops as an uninterrupted one.
    epoch_nonfinite: int = 0  # non-finite steps skipped
    epoch_nonfinite_run: int = 0  # of them, those in a row at `step`
    epoch_skipped: int = 0  # training images skipped as unreadable (all replicas)
    best_score: float = -math.inf  # of the run's metric (Plan.metric)
    best_ema_score: float = -math.inf  # --ema-decay: the moving average's, for best_ema.pt
    flat_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def finished(self, epochs: int, patience: int) -> str | None:
        """Why the run is over, or None."""
        if patience and self.flat_epochs >= patience:
            return "stopped early"
        return f"trained {self.epoch} epochs" if self.epoch >= epochs else None


@dataclass
class Run:
    """The pieces one replica trains with, built once."""

    plan: Plan
    rt: runtime.Runtime
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Trainer
    schedule: Schedule
    train_set: LeafImages
    val_set: LeafImages
    loader_batch: int  # per loader: one replica (spawn, ddp) or a host's devices (SPMD)
    eval_batch: int
    steps: int
    meta: dict[str, Any]
    writer: Any = None  # TensorBoard, on each host's writer
    compiles_counted: int = 0  # compilations already in earlier history rows
    cache_hits_counted: int = 0  # graphs loaded from the compile cache, likewise

    @property
    def global_batch(self) -> int:
        return self.loader_batch * self.rt.loaders

    def lr_at(self, epoch: float) -> float:
        if self.plan.args.lr_update == "epoch":
            return self.schedule(math.floor(epoch))
        return self.schedule(epoch)


def build(plan: Plan) -> Run:
    """Model, optimizer, trainer and data of this replica; every replica starts from replica
    0's weights."""
    args, data = plan.args, plan.data
    rt = runtime.setup(
        args.device,
        args.parallel,
        args.precision,
        runtime.compile_cache_dir(args.compile_cache, args.out_dir),
        args.dist_timeout,
    )
    rt.seed(args.seed)
    spec = ModelSpec(
        name=args.model,
        num_classes=len(data.classes),
        pretrained=args.pretrained,
        pretrained_tag=args.pretrained_tag,
        weights=args.weights,
        drop_rate=args.drop_rate,
        drop_path_rate=args.drop_path_rate,
    )
    model = create_model(spec)
    dcfg = data_config(model, plan.image_size)
    mean, std = args.mean or dcfg["mean"], args.std or dcfg["std"]
    model = model.to(rt.device)
    rt.broadcast_module(model)
    optimizer = create_optimizer(model, args.optimizer, args.weight_decay)
    trainer = Trainer(
        model,
        rt,
        multilabel=data.multilabel,
        mean=mean,
        std=std,
        optimizer=optimizer,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        mixing=mix.mix_from_args(args),
        ema_decay=args.ema_decay,
        max_nonfinite_steps=args.max_nonfinite_steps,
    )
    cache = ResizeCache(plan.cache_root, plan.image_size) if plan.cache_root else None
    train_set = LeafImages(
        [data.train.paths[i] for i in plan.train_index],
        plan.train_targets,
        plan.image_size,
        lambda: train_transform(args, plan.image_size),
        cache,
        skip_bad=args.skip_bad_images,
        in_ram=cache is not None,
    )
    val_set = LeafImages(
        [data.train.paths[i] for i in plan.val_index],
        data.train.targets[plan.val_index],  # the true labels, also with --soft-targets
        plan.image_size,
        cache=cache,
        skip_bad=args.skip_bad_images,
        in_ram=cache is not None,
    )
    # A loader feeds all devices of its process: one under spawn and ddp, a host's under SPMD.
    per_loader = rt.replicas // rt.loaders
    loader_batch = args.batch_size * per_loader
    meta = {
        "classes": data.classes,
        "label_format": data.label_format,
        "model_name": args.model,
        "image_size": plan.image_size,
        "mean": list(mean),
        "std": list(std),
        "resume_identity": rundir.resume_identity(
            args,
            classes=data.classes,
            image_size=plan.image_size,
            fold_digest=rundir.fold_digest(data.train.ids, plan.val_index),
            soft_targets=plan.soft_digest,
            replicas=rt.replicas,
        ),
    }
    return Run(
        plan=plan,
        rt=rt,
        model=model,
        optimizer=optimizer,
        trainer=trainer,
        schedule=from_args(args, rt.replicas),
        train_set=train_set,
        val_set=val_set,
        loader_batch=loader_batch,
        eval_batch=(args.eval_batch_size or 2 * args.batch_size) * per_loader,
        steps=len(train_set) // (loader_batch * rt.loaders),
        meta=meta,
    )


def restore(run: Run) -> RunState:
    """The state of `last.pt`, loaded into the model, the optimizer and the generators."""
    args = run.plan.args
    state, last = checkpoint.load_for_resume(run.plan.run_dir, warn=False)  # prepare warned
    if state["model_name"] != args.model:
        raise UserError(f"--resume: {last} holds a {state['model_name']}, not {args.model}")
    if state["step"] and state["steps_per_epoch"] != run.steps:
        raise UserError(
            f"--resume: {last} stopped at step {state['step']} of {state['steps_per_epoch']} "
            f"per epoch, this run has {run.steps} (batch size or replicas changed); "
            "resume with the same settings"
        )
    rundir.check_resume(state, run.meta["resume_identity"], last, force=args.force_resume)
    checkpoint.load_model_state(run.model, state, last)
    run.optimizer.load_state_dict(state["optimizer"])
    ema = run.trainer.ema
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    elif ema is not None:  # --ema-decay added by --force-resume: the average starts here
        ema.set(run.model)
    run.rt.set_rng_state(checkpoint.restore_rng_state(state["rng"]))
    return RunState(
        epoch=state["epoch"],
        step=state["step"],
        epoch_loss_sum=state["epoch_loss_sum"],
        # Absent from checkpoints of older versions: counted from the resume on, as they did.
        epoch_nonfinite=state.get("epoch_nonfinite", 0),
        epoch_nonfinite_run=state.get("epoch_nonfinite_run", 0),
        epoch_skipped=state.get("epoch_skipped", 0),
        best_score=saved_best(state, run.plan.metric, ema=False),
        best_ema_score=saved_best(state, run.plan.metric, ema=True),
        flat_epochs=state["flat_epochs"],
        history=state["history"],
    )


def saved_best(state: dict[str, Any], metric: Metric, ema: bool) -> float:
    """The best score a checkpoint holds, in `metric`. Checkpoints before the metric was chosen
    hold `best_auc`; where the metric changed, the best is the history's in the new one (or
    none: the next epoch's model becomes best.pt)."""
    prefix = "ema_" if ema else ""
    if state.get("metric", "auc") == metric.name:
        keys = (f"best_{prefix}score", f"best_{prefix}auc")
        return next((float(state[k]) for k in keys if k in state), -math.inf)
    scores = [row.get(f"{prefix}val_{metric.name}", math.nan) for row in state["history"]]
    finite = [x for x in scores if math.isfinite(x)]
    return max(finite, default=-math.inf)


def check_replicas_agree(run: Run, state: RunState) -> None:
    """Every replica (every host, on a pod) starts from the same epoch, step and weights.

    On a pod each host resumes from its own disk's last.pt: a host that lost its copy, or
    holds an older one, would otherwise train a different model in lockstep with the rest.
    """
    if run.rt.loaders == 1:
        return
    values = [state.epoch, state.step, *run.rt.module_digest(run.model)]
    if run.trainer.ema is not None:
        values += run.rt.module_digest(run.trainer.ema.module)
    # Each host reads --soft-targets and the folds file from its own disk: a differing copy
    # would train another model on that host's shard, or run another number of steps and
    # leave the others waiting at the epoch's end.
    plan = run.plan
    fold_digest = rundir.fold_digest(plan.data.train.ids, plan.val_index)
    values += [len(run.train_set), run.steps]
    for digest in (plan.soft_digest or "", fold_digest):
        values += [int(digest[i : i + 7] or "0", 16) for i in (0, 7)]
    try:
        run.rt.check_agree(values, "the run's state")
    except UserError:
        raise UserError(
            f"the replicas start from different states of {run.plan.run_dir} (epoch, step, "
            "weights, folds, training images or --soft-targets rows differ between hosts): "
            "give every host the same data, folds file, run folder (copy host 0's) and "
            "soft-target CSV, then --resume again"
        ) from None


def snapshot(run: Run, state: RunState) -> dict[str, Any]:
    """A checkpoint of `state`, with the run's weights, optimizer and generators."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.plan.args).items()}
    ema = run.trainer.ema
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        **({"ema": ema.module.state_dict()} if ema is not None else {}),
        "epoch": state.epoch,
        "step": state.step,
        "epoch_loss_sum": state.epoch_loss_sum,
        "epoch_nonfinite": state.epoch_nonfinite,
        "epoch_nonfinite_run": state.epoch_nonfinite_run,
        "epoch_skipped": state.epoch_skipped,
        "rng": checkpoint.plain_rng_state(run.rt.rng_state()),
        "metric": run.plan.metric.name,
        "best_score": state.best_score,
        "best_ema_score": state.best_ema_score,
        "history": state.history,
        "flat_epochs": state.flat_epochs,
        "steps_per_epoch": run.steps,
        "config": config,
        **run.meta,
    }


def weights_only(state: dict[str, Any], *, ema: bool = False) -> dict[str, Any]:
    """What prediction needs of a snapshot: the model's weights, or the moving average's as
    the model of a checkpoint of its own (best_ema.pt loads like best.pt)."""
    best = {k: v for k, v in state.items() if k not in ("optimizer", "ema")}
    if ema:
        best["model"] = state["ema"]
        best["best_score"] = state["best_ema_score"]
    return best


def average_buffers(run: Run) -> None:
    """BatchNorm statistics of the model (and its moving average) averaged over replicas."""
    run.rt.average_buffers(run.model)
    if run.trainer.ema is not None:
        run.rt.average_buffers(run.trainer.ema.module)


def announce(run: Run) -> None:
    """The run folder's config and TensorBoard writer; one line on what will train."""
    args, rt = run.plan.args, run.rt
    if rt.is_host_writer:
        # TensorBoard writes scalars without TensorFlow; its "notf" switch stops it importing TF
        # (slow and noisy) where TF happens to be installed.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))
        from torch.utils.tensorboard import SummaryWriter

        if not args.resume or not (run.plan.run_dir / "config.yaml").is_file():
            save_config(args, run.plan.run_dir / "config.yaml")  # a resume appends its changes
        run.writer = SummaryWriter(str(run.plan.run_dir / "tb"))
    if rt.is_master:
        scaled = f" ({args.lr_max:g} x {rt.replicas} replicas)" if args.scale_lr else ""
        print(
            f"{args.model}: {len(run.train_set)} train / {len(run.val_set)} validation images, "
            f"{run.steps} steps of {run.global_batch} per epoch ({args.batch_size} per replica) "
            f"on {rt.replicas} {rt.kind} replica(s) ({rt.parallel}); peak lr "
            f"{run.schedule.lr_max:.3g}{scaled} per {args.lr_update}; {run.plan.image_size}px, "
            f"{args.precision}; augment {args.augment_preset}, mixing "
            f"{mix.describe(run.trainer.mixing)}, EMA {args.ema_decay or 'off'}"
        )
        left_out = len(run.train_set) - run.steps * run.global_batch
        if left_out:
            print(
                f"note: each epoch leaves out {left_out} of the {len(run.train_set)} training "
                f"images (a different random set each epoch), too few to fill a batch of "
                f"{run.global_batch}; a global batch (--batch-size x replicas) that divides "
                f"{len(run.train_set)} uses them all"
            )
        if rt.compile_cache is not None:
            print(f"XLA compile cache: {rt.compile_cache} (graphs compiled before load from it)")


def _score(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


def _improves(score: float, best: float) -> bool:
    """A NaN score (an AUC where no class has both labels in the fold) is -inf: until a finite
    score appears, the latest epoch is the best, so best.pt and oof.csv always exist."""
    return _score(score) > best or best == -math.inf


def validation_scores(
    metric: Metric, targets: np.ndarray, probs: np.ndarray, classes: list[str], prefix: str = ""
) -> dict[str, float]:
    """history.csv's validation columns: the metric first (val_<name>, with the threshold it
    was scored at when it needs one), the mean AUC (val_auc) and each class's AUC."""
    aucs = column_auc(targets, probs)
    auc = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else math.nan
    scores = {}
    if metric.name != "auc":
        threshold = best_threshold(metric, targets, probs)
        scores[f"{prefix}val_{metric.name}"] = metric.score(targets, probs, threshold)
        if metric.thresholded:
            scores[f"{prefix}threshold"] = threshold
    scores[f"{prefix}val_auc"] = auc
    if not prefix:
        scores.update({f"auc_{c}": float(a) for c, a in zip(classes, aucs)})
    return scores


def train_epoch(run: Run, state: RunState) -> None:
    """Train `state.epoch` from `state.step` on, evaluate, and checkpoint; advances `state`."""
    args, rt, plan = run.plan.args, run.rt, run.plan
    epoch, first, started = state.epoch, state.step, time.time()
    batches = train_batches(
        len(run.train_set), run.loader_batch, rt.loaders, rt.loader_rank, args.seed, epoch, first
    )

    def on_step(step: int) -> None:
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < run.steps:
            run.trainer.check_finite(epoch)  # K non-finite steps in a row stop here
            totals = run.trainer.epoch_totals()
            mid = replace(
                state,
                step=step,
                epoch_loss_sum=float(totals.loss.item()),
                epoch_nonfinite=int(totals.nonfinite_steps.item()),
                epoch_nonfinite_run=int(totals.nonfinite_run.item()),
                epoch_skipped=state.epoch_skipped + run.trainer.skipped_images(),
            )
            average_buffers(run)
            checkpoint.save(rt, plan.run_dir / "last.pt", snapshot(run, mid))

    # Called from a closure thread, possibly after the loop has moved on: epoch is bound.
    def log(step: int, loss: float, lr: float) -> None:
        if run.writer is not None:
            run.writer.add_scalar("train/loss", loss, epoch * run.steps + step)
            run.writer.add_scalar("train/lr", lr, epoch * run.steps + step)

    loader = BatchLoader(run.train_set, batches, args.workers)
    train_loss = run.trainer.train_one_epoch(
        loader,
        epoch=epoch,
        steps=run.steps,
        start_step=first,
        lr_at=run.lr_at,
        on_step=on_step,
        log=log,
        log_every=args.log_every,
        loss_sum=state.epoch_loss_sum,
        nonfinite=(state.epoch_nonfinite, state.epoch_nonfinite_run),
    )
    train_seconds = time.time() - started
    nonfinite = run.trainer.nonfinite_steps()
    if nonfinite and rt.is_master:
        print(
            f"warning: epoch {epoch}: skipped {nonfinite} step(s) with a non-finite loss or "
            "gradients (they changed no weights)"
        )
    check_skipped(run, loader.skipped, epoch, before=state.epoch_skipped)
    average_buffers(run)  # every replica evaluates (and saves) the same model
    val_targets = plan.data.train.targets[plan.val_index]

    def validate(ema: bool) -> tuple[np.ndarray, float]:
        return run.trainer.evaluate(
            BatchLoader(
                run.val_set,
                eval_batches(len(run.val_set), run.eval_batch, rt.loaders, rt.loader_rank),
                args.workers,
            ),
            len(run.val_set),
            ema=ema,
        )

    metric, classes = plan.metric, plan.data.classes
    key = f"val_{metric.name}"
    probs, val_loss = validate(ema=False)
    row = {
        "epoch": epoch,
        "lr": run.lr_at(epoch),
        "train_loss": train_loss,
        "val_loss": val_loss,
        **validation_scores(metric, val_targets, probs, classes),
        "nonfinite_steps": nonfinite,
    }
    if run.trainer.ema is not None:
        ema_probs, row["ema_val_loss"] = validate(ema=True)
        row.update(validation_scores(metric, val_targets, ema_probs, classes, prefix="ema_"))
    row["images_per_sec"] = (run.steps - first) * run.global_batch / train_seconds
    row["seconds"] = time.time() - started
    row["compiles"] = rt.compile_count() - run.compiles_counted
    run.compiles_counted += row["compiles"]
    row["cached_graphs"] = rt.cache_hits() - run.cache_hits_counted
    run.cache_hits_counted += row["cached_graphs"]
    state.history.append(row)
    improved = _improves(row[key], state.best_score)
    state.best_score = _score(row[key]) if improved else state.best_score
    improved_ema = run.trainer.ema is not None and _improves(
        row[f"ema_{key}"], state.best_ema_score
    )
    state.best_ema_score = _score(row[f"ema_{key}"]) if improved_ema else state.best_ema_score
    # --patience: epochs in which neither the model nor its moving average improved.
    state.flat_epochs = 0 if improved or improved_ema else state.flat_epochs + 1
    state.epoch, state.step, state.epoch_loss_sum = epoch + 1, 0, 0.0
    state.epoch_nonfinite = state.epoch_nonfinite_run = state.epoch_skipped = 0
    write_epoch(run, state, improved, improved_ema)
    val_ids = [plan.data.train.ids[i] for i in plan.val_index]
    for better, ema, name, oof_name in [
        (improved, False, "best.pt", "oof.csv"),
        (improved_ema, True, "best_ema.pt", "oof_ema.csv"),
    ]:
        if not better:
            continue
        checkpoint.save(rt, plan.run_dir / name, weights_only(snapshot(run, state), ema=ema))
        if rt.is_host_writer:
            if not ema:
                rundir.commit_overwrite(plan.run_dir)  # the old run --overwrite kept can go
            oof = pd.DataFrame(ema_probs if ema else probs, columns=plan.data.classes)
            oof.insert(0, "image_id", val_ids)
            atomic_to_csv(oof, plan.run_dir / oof_name)
    checkpoint.save(rt, plan.run_dir / "last.pt", snapshot(run, state))


STRONG_PRESET_SIZE = 480  # the shorter side the `strong` preset was designed for
FINE_TUNING_LR = 1e-4  # peaks below this suit pretrained weights, not training from scratch


def setting_warnings(args: argparse.Namespace, image_size: int | str) -> list[str]:
    """Settings that run, but are unlikely to learn: said before anything compiles."""
    warnings = []
    schedule = from_args(args)
    if args.epochs <= args.ramp_epochs and schedule.lr_start < schedule.lr_max:
        last = schedule(args.epochs - 1 if args.lr_update == "epoch" else args.epochs)
        warnings.append(
            f"--epochs {args.epochs} <= --ramp-epochs {args.ramp_epochs:g}: the whole run is the "
            f"warm-up, the learning rate rising from {schedule.lr_start:g} to {last:.3g} at the "
            f"end (peak --lr {schedule.lr_max:g}); lower --ramp-epochs or raise --epochs"
        )
    if not args.pretrained and not args.weights and args.lr_max < FINE_TUNING_LR:
        warnings.append(
            f"--no-pretrained trains from random weights, but the peak --lr {args.lr_max:g} is a "
            f"fine-tuning rate; from scratch, raise --lr (e.g. 1e-3) or drop --no-pretrained"
        )
    shorter = min(image_shape(image_size))
    if args.augment_preset == "strong" and shorter < STRONG_PRESET_SIZE / 3:
        warnings.append(
            f"--augment-preset strong was designed for about {STRONG_PRESET_SIZE} px images: at "
            f"{image_size} px its 3-px blurs and 20% shifts, zooms and rotations can hide what "
            "the model should learn; use --augment-preset seed or a larger --image-size"
        )
    return warnings


def warn_unreadable_test_images(unreadable: dict[Path, str], data: DataSet) -> None:
    """Training never reads the test images: a missing or broken one is a warning here (predict
    and check still refuse it)."""
    if unreadable:
        first = next(iter(unreadable.values()))
        more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
        data.warnings.append(
            f"{first}{more}: a test image; training goes on without it, but predict will refuse "
            "the data set until it is fixed"
        )


def check_unreadable(
    unreadable: dict[Path, str],
    data: DataSet,
    val_index: np.ndarray,
    train_samples: int,
    max_fraction: float,
) -> None:
    """Images found unreadable before training, under --skip-bad-images: a validation one is
    an error (its score would be invented), training ones a warning up to the fraction."""
    val_paths = {data.train.paths[i] for i in val_index}
    in_val = [error for path, error in unreadable.items() if path in val_paths]
    if in_val:
        more = f" (and {len(in_val) - 1} more)" if len(in_val) > 1 else ""
        raise UserError(
            f"{in_val[0]}; a validation image of this fold{more}, and --skip-bad-images "
            "skips training images only, so replace or remove it"
        )
    names = ", ".join(p.name for p in list(unreadable)[:5])
    names += f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
    if len(unreadable) > max_fraction * train_samples:
        raise UserError(
            f"{len(unreadable)} of {train_samples} training images cannot be read ({names}), "
            f"more than --max-bad-fraction {max_fraction:g}; replace or remove them "
            f"(python -m leaf_xla.check --data-dir {data.data_dir} lists them all)"
        )
    data.warnings.append(
        f"{len(unreadable)} training image(s) cannot be read and are skipped every epoch "
        f"(--skip-bad-images): {names}"
    )


def check_skipped(run: Run, mine: list[int], epoch: int, before: int) -> None:
    """Name the training images skipped as unreadable this epoch (`before`: how many before
    the resume, if any, named by count only); stop when they are more than the allowed
    fraction of the training images, the measure check_unreadable applies before training.
    Every replica calls it and sees the same count, so all stop together."""
    count = before + run.trainer.skipped_images()
    samples = len(run.train_set)
    if count == 0:
        return
    # Fixed length (a loader's samples per epoch), -1 padded: one gathered shape every epoch.
    positions = torch.full((run.steps * run.loader_batch,), -1, dtype=torch.int32)
    positions[: len(mine)] = torch.tensor(mine, dtype=torch.int32)
    gathered = run.rt.all_gather(positions.to(run.rt.device)).cpu().numpy()
    paths = [run.train_set.paths[i] for i in sorted(set(gathered[gathered >= 0].tolist()))]
    names = ", ".join(p.name for p in paths[:5])
    more = count - min(len(paths), 5)  # under multi-host SPMD a host lists its own only
    names += f" and {more} more" if more > 0 else ""
    args = run.plan.args
    if count > args.max_bad_fraction * samples:
        raise UserError(
            f"epoch {epoch}: {count} of {samples} training images cannot be decoded "
            f"({names}), more than --max-bad-fraction {args.max_bad_fraction:g}; replace or "
            f"remove them (python -m leaf_xla.check lists them all) or raise the fraction"
        )
    if run.rt.is_master:
        print(f"warning: epoch {epoch}: skipped {count} unreadable training images: {names}")


def write_epoch(run: Run, state: RunState, improved: bool, improved_ema: bool) -> None:
    """history.csv and TensorBoard on each host, the epoch's line on the master."""
    row = state.history[-1]
    if run.rt.is_host_writer:
        atomic_to_csv(pd.DataFrame(state.history), run.plan.run_dir / "history.csv")
        metric = f"val_{run.plan.metric.name}"
        shown = ("train_loss", "val_loss", metric, "val_auc", "ema_val_loss", f"ema_{metric}")
        for key in dict.fromkeys(shown):
            if key in row:
                run.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])
        run.writer.add_scalar("epoch/images_per_sec", row["images_per_sec"], row["epoch"])
        run.writer.flush()
    if run.rt.is_master:
        metric = run.plan.metric
        cached = f", {row['cached_graphs']} from the compile cache" if row["cached_graphs"] else ""
        ema = (
            f"  EMA {_scores_text(row, metric, 'ema_')}{'  (best)' if improved_ema else ''}"
            if "ema_val_auc" in row
            else ""
        )
        print(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  {_scores_text(row, metric)}"
            f"{'  (best)' if improved else ''}{ema}  {row['images_per_sec']:.1f} img/s  "
            f"{row['compiles']} compile(s){cached}"
        )


def _scores_text(row: dict, metric: Metric, prefix: str = "") -> str:
    """`val AUC 0.91`, or `val accuracy 0.83 (AUC 0.91)`: the metric first."""
    auc = f"{row[f'{prefix}val_auc']:.4f}"
    if metric.name == "auc":
        return f"val AUC {auc}"
    at = f" at threshold {row[f'{prefix}threshold']:.2f}" if metric.thresholded else ""
    return f"val {metric.name} {row[f'{prefix}val_{metric.name}']:.4f}{at} (AUC {auc})"


def report(run: Run, state: RunState) -> None:
    """The end of the run: plots on each host, the best score on the master."""
    if run.rt.is_host_writer:
        run.writer.close()
        from leaf_xla.report import training_plots

        plan = run.plan
        training_plots(
            plan.run_dir,
            plan.data.classes,
            plan.data.multilabel,
            run.schedule,
            plan.args.epochs,
            plan.data.train.targets[plan.val_index],
        )
    if run.rt.is_master:
        best = state.best_score
        shown = f"{best:.4f}" if math.isfinite(best) else "n/a (no class had both labels)"
        if run.trainer.ema is not None and math.isfinite(state.best_ema_score):
            shown += f" (EMA {state.best_ema_score:.4f}: best_ema.pt)"
        print(f"best val {run.plan.metric.shown} {shown}; run directory: {run.plan.run_dir}")


def train_worker(plan: Plan) -> None:
    """One replica's training run (every started process runs this): build, restore, check
    that all replicas agree, train epoch by epoch, report."""
    args = plan.args
    run = build(plan)
    state = restore(run) if args.resume else RunState()
    check_replicas_agree(run, state)
    done = state.finished(args.epochs, args.patience)
    if done:
        if run.rt.is_master:
            print(
                f"nothing to resume: {plan.run_dir} is finished ({done}); raise --epochs "
                "or --patience to train on"
            )
        run.rt.shutdown()
        return
    if args.resume and run.rt.is_master:
        print(f"resuming {plan.run_dir} at epoch {state.epoch} step {state.step}")
    announce(run)
    run.compiles_counted = run.rt.compile_count()
    run.cache_hits_counted = run.rt.cache_hits()
    with run.rt.watched(args.dist_timeout):
        while not state.finished(args.epochs, args.patience):
            train_epoch(run, state)
    if args.patience and state.flat_epochs >= args.patience and run.rt.is_master:
        print(
            f"early stop: no better validation {plan.metric.shown} for {state.flat_epochs} epochs"
        )
    report(run, state)
    run.rt.shutdown()


def resume_advice(run_dir: Path, argv: Sequence[str]) -> str:
    """What a Ctrl-C leaves: the checkpoint that holds the run's state and the command that
    continues it."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return f"nothing was saved to {run_dir} yet: run the same command again to start over"
    again = [a for a in argv if a not in ("--overwrite", "--resume")]
    command = shlex.join(["python", "-m", "leaf_xla.train", *again, "--resume"])
    return f"{last} holds the run's last saved state; continue it with:\n  {command}"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(build_parser(), argv)
    layout = runtime.launch_from_args(args)
    plan = runtime.on_host_writer(lambda: prepare(args), layout)
    try:
        runtime.launch(train_worker, (plan,), layout)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_advice(plan.run_dir, argv)) from None


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
