"""Train one model on one fold; everything a later resume, prediction or ensemble needs lands in
the run directory.

    python -m leaf_xla.train --model tf_efficientnet_b7 --config configs/tf_efficientnet_b7.yaml \\
        --data-dir data/plant-pathology-2020-fgvc7 --out-dir runs

Run directory (<out-dir>/<model>-fold<k>): best.pt, last.pt, config.yaml, history.csv, oof.csv,
tb/ (TensorBoard), plots/*.png. `--resume` continues from last.pt after a kill or preemption.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leaf_xla import checkpoint, folds, rundir, runtime
from leaf_xla.cli import UserError
from leaf_xla.config import add_config_option, parse_args, save_config, yaml_value
from leaf_xla.data import LABEL_FORMATS, SHOWN, DataSet, Problems, read_dataset
from leaf_xla.engine import create_optimizer, trainer_class
from leaf_xla.files import atomic_to_csv
from leaf_xla.loader import (
    BatchLoader,
    LeafImages,
    ResizeCache,
    default_cache_root,
    eval_batches,
    train_batches,
)
from leaf_xla.metrics import column_auc
from leaf_xla.models import ModelSpec, create_model, data_config, default_image_size
from leaf_xla.schedule import add_schedule_options, from_args
from leaf_xla.transforms import create_transform


def build_parser(
    prog: str = "python -m leaf_xla.train", description: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or __doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_option(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, help="competition folder (train.csv, images)")
    data.add_argument("--out-dir", type=Path, default=Path("runs"), help="where runs are written")
    data.add_argument("--run-name", help="run folder name (default: <model>-fold<k>)")
    data.add_argument("--label-format", choices=LABEL_FORMATS, default="auto")
    data.add_argument("--classes", nargs="+", help="class names (default: from the data)")
    data.add_argument(
        "--folds-file",
        type=Path,
        help="folds CSV shared by the ensemble (default: <out-dir>/folds.csv)",
    )
    data.add_argument("--n-folds", type=int, default=5)
    data.add_argument("--fold", type=int, default=0, help="the fold used for validation")
    data.add_argument("--holdout", type=float, help="validate on this fraction instead of folds")
    data.add_argument("--fold-seed", type=int, default=42)
    data.add_argument("--image-size", type=int, help="square input size (default: the model's)")
    data.add_argument(
        "--cache",
        choices=("auto", "build", "off"),
        default="auto",
        help="resize cache: use when present / build first / never",
    )
    data.add_argument("--cache-dir", type=Path, help="default: <data-dir>/.leaf_xla_cache")
    data.add_argument("--workers", type=int, default=4, help="decoding threads per process")

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

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    aug.add_argument("--vflip", type=float, default=0.5, help="vertical flip probability")
    aug.add_argument(
        "--augment",
        type=yaml_value,
        default=[],
        help="more albumentations transforms, a YAML list (see transforms.py)",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=16, help="per replica (TPU core)")
    opt.add_argument("--eval-batch-size", type=int, help="per replica (default: 2x batch size)")
    opt.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    add_schedule_options(parser)

    run = parser.add_argument_group("runtime")
    run.add_argument("--device", choices=runtime.DEVICES, default="auto")
    run.add_argument(
        "--parallel",
        choices=runtime.PARALLEL,
        default="auto",
        help="spawn: a process per TPU core; spmd: one process, sharded batch",
    )
    run.add_argument("--precision", choices=runtime.PRECISIONS, default="fp32")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--compile-cache", type=Path, help="persistent XLA compilation cache folder")
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
    """What the parent process settles before any replica starts (and what it passes them)."""

    args: argparse.Namespace
    data: DataSet
    train_index: np.ndarray
    val_index: np.ndarray
    run_dir: Path
    image_size: int
    cache_root: Path | None


def prepare(args: argparse.Namespace) -> Plan:
    """Checks, folds, cache and run folder: fail here, before any compilation."""
    if not args.model:
        raise UserError("--model is required (a timm name or a Keras alias), or set it in --config")
    if not args.data_dir:
        raise UserError("--data-dir is required, or set data_dir in --config")
    for name in ("epochs", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    from leaf_xla.models import resolve_name

    resolve_name(args.model)
    from_args(args)  # schedule values checked now, not after compiling
    data = read_dataset(args.data_dir, args.label_format, args.classes)
    folds_file = args.folds_file or args.out_dir / "folds.csv"
    fold_of = folds.load_or_create(
        folds_file, data.train.ids, data.train.targets, args.n_folds, args.fold_seed, args.holdout
    )
    if args.fold not in set(fold_of.tolist()) or args.fold < 0:
        raise UserError(f"--fold {args.fold}: {folds_file} has folds 0..{fold_of.max()}")
    image_size = args.image_size or default_image_size(args.model)

    cache_root = None
    if args.cache != "off":
        root = args.cache_dir or default_cache_root(data.data_dir)
        cache = ResizeCache(root, image_size)
        if args.cache == "build" or cache.exists:
            problems = Problems()
            built = cache.build(data.train.paths, args.workers, problems)
            problems.raise_if_any(
                f"{data.data_dir} (while building the {image_size}px cache)", data.data_dir
            )
            data.warnings.extend(problems.warnings)
            if built:
                print(f"cache: {built} image(s) resized into {cache.dir}")
            cache_root = root

    for warning in data.warnings[:SHOWN]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(data.warnings) > SHOWN:
        print(
            f"warning: and {len(data.warnings) - SHOWN} more (python -m leaf_xla.check "
            f"--data-dir {data.data_dir} lists them)",
            file=sys.stderr,
        )

    val_index = np.flatnonzero(fold_of == args.fold)
    run_dir = args.out_dir / rundir.check_name(args.run_name or f"{args.model}-fold{args.fold}")
    rundir.lock_run(run_dir)  # until this process ends: no other run touches the folder
    rundir.recover_overwrite(run_dir)
    if args.resume:
        if not any((run_dir / name).is_file() for name in ("last.pt", "last.prev.pt")):
            raise UserError(f"--resume: {run_dir / 'last.pt'} not found")
        identity = rundir.resume_identity(
            args,
            classes=data.classes,
            image_size=image_size,
            fold_digest=rundir.fold_digest(data.train.ids, val_index),
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
        args,
        data,
        np.flatnonzero(fold_of != args.fold),
        val_index,
        run_dir,
        image_size,
        cache_root,
    )


def _compile_count(rt: runtime.Runtime) -> int:
    """XLA compilations so far in this process (0 off XLA: nothing compiles there)."""
    if not rt.is_xla:
        return 0
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def train_worker(plan: Plan) -> None:
    """One replica's training run (every spawned process runs this)."""
    args, data = plan.args, plan.data
    rt = runtime.setup(args.device, args.parallel, args.precision, args.compile_cache)
    rt.seed(args.seed)
    spec = ModelSpec(
        args.model,
        len(data.classes),
        args.pretrained,
        args.pretrained_tag,
        args.weights,
        args.drop_rate,
        args.drop_path_rate,
    )
    model = create_model(spec)
    dcfg = data_config(model, plan.image_size)
    mean, std = args.mean or dcfg["mean"], args.std or dcfg["std"]
    model = model.to(rt.device)
    optimizer = create_optimizer(model, args.optimizer, args.weight_decay)
    trainer = trainer_class(rt)(
        model, rt, data.multilabel, mean, std, optimizer, args.label_smoothing, seed=args.seed
    )
    schedule = from_args(args, rt.replicas)

    cache = ResizeCache(plan.cache_root, plan.image_size) if plan.cache_root else None
    targets = data.train.targets
    paths = [data.train.paths[i] for i in plan.train_index]
    train_set = LeafImages(
        paths,
        targets[plan.train_index],
        plan.image_size,
        lambda: create_transform(args.hflip, args.vflip, args.augment),
        cache,
    )
    val_ids = [data.train.ids[i] for i in plan.val_index]
    val_set = LeafImages(
        [data.train.paths[i] for i in plan.val_index],
        targets[plan.val_index],
        plan.image_size,
        cache=cache,
    )
    # A loader feeds all devices of its process: one under spawn, all local ones under SPMD.
    loader_batch = args.batch_size * (rt.replicas // rt.loaders)
    eval_batch = (args.eval_batch_size or 2 * args.batch_size) * (rt.replicas // rt.loaders)
    steps = len(train_set) // (loader_batch * rt.loaders)

    meta = {
        "classes": data.classes,
        "label_format": data.label_format,
        "model_name": args.model,
        "image_size": plan.image_size,
        "mean": list(mean),
        "std": list(std),
    }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    start_epoch, start_step, start_loss, best, history, flat = 0, 0, 0.0, -math.inf, [], 0
    if args.resume:
        last = plan.run_dir / "last.pt"
        state = checkpoint.load(last)
        if state["model_name"] != args.model:
            raise UserError(f"--resume: {last} holds a {state['model_name']}, not {args.model}")
        start_epoch, start_step, start_loss = state["epoch"], state["step"], state["epoch_loss_sum"]
        if start_step and state["steps_per_epoch"] != steps:
            raise UserError(
                f"--resume: {last} stopped at step {start_step} of {state['steps_per_epoch']} "
                f"per epoch, this run has {steps} (batch size or replicas changed); "
                "resume with the same settings"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rt.set_rng_state(checkpoint.restore_rng_state(state["rng"]))
        best, history, flat = state["best_auc"], state["history"], state["flat_epochs"]
        stopped = args.patience and flat >= args.patience
        if start_epoch >= args.epochs or stopped:
            if rt.is_master:
                why = "stopped early" if stopped else f"trained {start_epoch} epochs"
                print(
                    f"nothing to resume: {plan.run_dir} is finished ({why}); raise --epochs "
                    "or --patience to train on"
                )
            return
        if rt.is_master:
            print(f"resuming {plan.run_dir} at epoch {start_epoch} step {start_step}")

    def snapshot(epoch: int, step: int, loss_sum: float = 0.0) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "epoch_loss_sum": loss_sum,  # the loss of the epoch's steps so far, for history
            "rng": checkpoint.plain_rng_state(rt.rng_state()),
            "best_auc": best,
            "history": history,
            "flat_epochs": flat,
            "steps_per_epoch": steps,
            "config": config,
            **meta,
        }

    writer = None
    if rt.is_master:
        # TensorBoard writes scalars without TensorFlow; its "notf" switch stops it importing TF
        # (slow and noisy) where TF happens to be installed.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))
        from torch.utils.tensorboard import SummaryWriter

        save_config(args, plan.run_dir / "config.yaml")
        writer = SummaryWriter(str(plan.run_dir / "tb"))
        print(
            f"{args.model}: {len(train_set)} train / {len(val_set)} validation images, "
            f"{steps} steps of {loader_batch * rt.loaders} per epoch on {rt.replicas} "
            f"{rt.kind} replica(s) ({rt.parallel}), {plan.image_size}px, {args.precision}"
        )

    # Compilations since the previous row: the previous epoch's checkpoint saves count too.
    counted = _compile_count(rt)
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        first = start_step if epoch == start_epoch else 0
        batches = train_batches(
            len(train_set), loader_batch, rt.loaders, rt.loader_rank, args.seed, epoch, first
        )

        def on_step(step: int, epoch: int = epoch) -> None:
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < steps:
                trainer.check_finite(epoch)  # never save a state that went non-finite
                loss_sum = float(trainer.epoch_totals()[0].item())
                checkpoint.save(rt, plan.run_dir / "last.pt", snapshot(epoch, step, loss_sum))

        # Called from a closure thread, possibly after the loop has moved on: epoch is bound.
        def log(step: int, loss: float, lr: float, epoch: int = epoch) -> None:
            if writer is not None:
                writer.add_scalar("train/loss", loss, epoch * steps + step)
                writer.add_scalar("train/lr", lr, epoch * steps + step)

        train_loss = trainer.train_one_epoch(
            BatchLoader(train_set, batches, args.workers),
            epoch,
            steps,
            first,
            schedule,
            on_step,
            log,
            args.log_every,
            start_loss if epoch == start_epoch else 0.0,
        )
        train_seconds = time.time() - started
        probs, val_loss = trainer.evaluate(
            BatchLoader(
                val_set,
                eval_batches(len(val_set), eval_batch, rt.loaders, rt.loader_rank),
                args.workers,
            ),
            len(val_set),
        )
        aucs = column_auc(targets[plan.val_index], probs)
        auc = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
        row = {
            "epoch": epoch,
            "lr": schedule(epoch),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_auc": auc,
            **{f"auc_{c}": float(a) for c, a in zip(data.classes, aucs)},
            "images_per_sec": (steps - first) * loader_batch * rt.loaders / train_seconds,
            "seconds": time.time() - started,
            "compiles": _compile_count(rt) - counted,
        }
        counted += row["compiles"]
        history.append(row)
        # A NaN AUC (no class has both labels in the fold) scores -inf: until a finite score
        # appears, the latest epoch is the best, so best.pt and oof.csv always exist.
        score = auc if math.isfinite(auc) else -math.inf
        improved = score > best or best == -math.inf
        if improved:
            best, flat = score, 0
        else:
            flat += 1
        if rt.is_master:
            atomic_to_csv(pd.DataFrame(history), plan.run_dir / "history.csv")
            for key in ("train_loss", "val_loss", "val_auc", "images_per_sec"):
                writer.add_scalar(f"epoch/{key}", row[key], epoch)
            writer.flush()
            print(
                f"epoch {epoch}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val AUC {auc:.4f}{'  (best)' if improved else ''}  "
                f"{row['images_per_sec']:.1f} img/s  {row['compiles']} compile(s)"
            )
        if improved:
            best_state = snapshot(epoch + 1, 0)
            best_state.pop("optimizer")  # prediction needs the weights only
            checkpoint.save(rt, plan.run_dir / "best.pt", best_state)
            if rt.is_master:
                oof = pd.DataFrame(probs, columns=data.classes)
                oof.insert(0, "image_id", val_ids)
                atomic_to_csv(oof, plan.run_dir / "oof.csv")
        checkpoint.save(rt, plan.run_dir / "last.pt", snapshot(epoch + 1, 0))
        if args.patience and flat >= args.patience:
            if rt.is_master:
                print(f"early stop: no better validation AUC for {flat} epochs")
            break

    if rt.is_master:
        writer.close()
        from leaf_xla.report import training_plots

        training_plots(
            plan.run_dir,
            data.classes,
            data.multilabel,
            schedule,
            args.epochs,
            targets[plan.val_index],
        )
        shown = f"{best:.4f}" if math.isfinite(best) else "n/a (no class had both labels)"
        print(f"best val AUC {shown}; run directory: {plan.run_dir}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    plan = prepare(args)
    runtime.launch(train_worker, (plan,), args.device, args.parallel)


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
