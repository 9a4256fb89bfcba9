"""Train one model on one fold: the run's life, from its plan to its last epoch.

    fit(TrainSettings(data=DataSettings(data_dir=...), model=ModelSettings(model="resnet18")))

`preflight.plan_run` settles the data, folds and run folder once per host; every replica then
builds its model, optimizer and data (`build`), restores `last.pt` on a resume (`restore`),
and trains epoch by epoch (`train_epoch`), evaluating, saving and logging after each. What the
run folder holds is rundir's; the step itself is engine's; the device and the replicas are the
backend's.
"""

from __future__ import annotations

import math
import sys
import time
import types
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from leaf_xla import backends, mix, rundir
from leaf_xla.backends.base import Runtime
from leaf_xla.checkpoint import (
    RunState,
    load_model_state,
    plain_rng_state,
    restore_rng_state,
    run_state,
    weights_only,
)
from leaf_xla.config import plain, save_config
from leaf_xla.engine import Trainer, create_optimizer
from leaf_xla.errors import UserError, not_a_command
from leaf_xla.files import atomic_to_csv
from leaf_xla.loader import BatchLoader, LeafImages, ResizeCache, eval_batches, train_batches
from leaf_xla.metrics import Metric, validation_scores
from leaf_xla.models import ModelSpec, create_model, data_config
from leaf_xla.preflight import Plan, plan_run, train_transform
from leaf_xla.schedule import Schedule
from leaf_xla.settings import TrainSettings


def fit(settings: TrainSettings) -> None:
    """Train as `settings` say: checks and the run folder once per host, then every replica."""
    plan = backends.on_host_writer(lambda: plan_run(settings), settings.launch)
    try:
        backends.launch(train_worker, (plan,), settings.launch)
    except KeyboardInterrupt as err:
        raise Interrupted(plan.run_dir) from err
    # Held until here: a failed run keeps it until the process ends, when --overwrite's
    # old folder is put back.
    rundir.unlock_run(plan.run_dir)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: `run_dir`'s last.pt holds what was saved."""

    def __init__(self, run_dir: Any):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


@dataclass
class Run:
    """The pieces one replica trains with, built once."""

    plan: Plan
    rt: Runtime
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
        if self.plan.settings.optim.lr_update == "epoch":
            return self.schedule(math.floor(epoch))
        return self.schedule(epoch)


def build(plan: Plan) -> Run:
    """Model, optimizer, trainer and data of this replica; every replica starts from replica
    0's weights."""
    settings, data = plan.settings, plan.data
    rt = backends.setup(
        settings.launch.device,
        settings.launch.parallel,
        settings.run.precision,
        backends.compile_cache_dir(settings.launch.compile_cache, settings.data.out_dir),
        settings.launch.dist_timeout,
    )
    rt.seed(settings.run.seed)
    model, mean, std = build_model(plan, rt)
    optimizer = create_optimizer(model, settings.optim.optimizer, settings.optim.weight_decay)
    trainer = Trainer(
        model,
        rt,
        multilabel=data.multilabel,
        mean=mean,
        std=std,
        optimizer=optimizer,
        label_smoothing=settings.optim.label_smoothing,
        seed=settings.run.seed,
        mixing=mix.enabled(settings.mix),
        ema_decay=settings.optim.ema_decay,
        max_nonfinite_steps=settings.optim.max_nonfinite_steps,
    )
    train_set, val_set = build_datasets(plan)
    loader_batch = settings.optim.batch_size * rt.per_loader
    return Run(
        plan=plan,
        rt=rt,
        model=model,
        optimizer=optimizer,
        trainer=trainer,
        schedule=Schedule.of(settings.schedule, rt.replicas),
        train_set=train_set,
        val_set=val_set,
        loader_batch=loader_batch,
        eval_batch=(settings.optim.eval_batch_size or 2 * settings.optim.batch_size)
        * rt.per_loader,
        steps=len(train_set) // (loader_batch * rt.loaders),
        meta=checkpoint_meta(plan, rt, mean, std),
    )


def checkpoint_meta(plan: Plan, rt: Runtime, mean: list[float], std: list[float]) -> dict:
    """What every checkpoint of the run holds besides its state: what prediction needs, and
    what a resume may not change."""
    settings, data = plan.settings, plan.data
    return {
        "classes": data.classes,
        "label_format": data.label_format,
        "model_name": settings.model.model,
        "image_size": plan.image_size,
        "mean": list(mean),
        "std": list(std),
        "resume_identity": rundir.resume_identity(
            settings,
            classes=data.classes,
            image_size=plan.image_size,
            fold_digest=rundir.fold_digest(data.train.ids, plan.val_index),
            soft_targets=plan.soft_digest,
            replicas=rt.replicas,
        ),
    }


def build_model(plan: Plan, rt: Runtime) -> tuple[torch.nn.Module, list[float], list[float]]:
    """The model on the device with replica 0's weights, and its normalisation mean and std."""
    settings = plan.settings.model
    spec = ModelSpec(
        name=settings.model,
        num_classes=len(plan.data.classes),
        pretrained=settings.pretrained,
        pretrained_tag=settings.pretrained_tag,
        weights=settings.weights,
        drop_rate=settings.drop_rate,
        drop_path_rate=settings.drop_path_rate,
    )
    model = create_model(spec)
    dcfg = data_config(model, plan.image_size)
    mean, std = settings.mean or dcfg["mean"], settings.std or dcfg["std"]
    model = model.to(rt.device)
    rt.broadcast_module(model)
    return model, mean, std


def build_datasets(plan: Plan) -> tuple[LeafImages, LeafImages]:
    """The fold's training images (augmented) and validation images (true labels)."""
    data, settings = plan.data, plan.settings
    cache = ResizeCache(plan.cache_root, plan.image_size) if plan.cache_root else None
    train_set = LeafImages(
        [data.train.paths[i] for i in plan.train_index],
        plan.train_targets,
        plan.image_size,
        lambda: train_transform(settings, plan.image_size),
        cache,
        skip_bad=settings.data.skip_bad_images,
        in_ram=cache is not None,
    )
    val_set = LeafImages(
        [data.train.paths[i] for i in plan.val_index],
        data.train.targets[plan.val_index],  # the true labels, also with --soft-targets
        plan.image_size,
        cache=cache,
        skip_bad=settings.data.skip_bad_images,
        in_ram=cache is not None,
    )
    return train_set, val_set


def restore(run: Run) -> RunState:
    """The state of `last.pt`, loaded into the model, the optimizer and the generators."""
    settings = run.plan.settings
    state, last = rundir.load_for_resume(run.plan.run_dir, warn=False)  # open_run warned
    if state["model_name"] != settings.model.model:
        raise UserError(
            f"--resume: {last} holds a {state['model_name']}, not {settings.model.model}"
        )
    if state["step"] and state["steps_per_epoch"] != run.steps:
        raise UserError(
            f"--resume: {last} stopped at step {state['step']} of {state['steps_per_epoch']} "
            f"per epoch, this run has {run.steps} (batch size or replicas changed); "
            "resume with the same settings"
        )
    rundir.check_resume(state, run.meta["resume_identity"], last, force=settings.run.force_resume)
    load_model_state(run.model, state, last)
    run.optimizer.load_state_dict(state["optimizer"])
    ema = run.trainer.ema
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    elif ema is not None:  # --ema-decay added by --force-resume: the average starts here
        ema.set(run.model)
    run.rt.set_rng_state(restore_rng_state(state["rng"]))
    return run_state(state, run.plan.metric)


def snapshot(run: Run, state: RunState) -> dict[str, Any]:
    """A checkpoint of `state`, with the run's weights, optimizer and generators."""
    ema = run.trainer.ema
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        **({"ema": ema.module.state_dict()} if ema is not None else {}),
        **state.fields(),
        "rng": plain_rng_state(run.rt.rng_state()),
        "metric": run.plan.metric.name,
        "steps_per_epoch": run.steps,
        "config": plain(run.plan.settings.flat()),
        **run.meta,
    }


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


def average_buffers(run: Run) -> None:
    """BatchNorm statistics of the model (and its moving average) averaged over replicas."""
    run.rt.average_buffers(run.model)
    if run.trainer.ema is not None:
        run.rt.average_buffers(run.trainer.ema.module)


def announce(run: Run) -> None:
    """The run folder's config and TensorBoard writer; one line on what will train."""
    settings, rt, run_dir = run.plan.settings, run.rt, run.plan.run_dir
    if rt.is_host_writer:
        # TensorBoard writes scalars without TensorFlow; its "notf" switch stops it importing TF
        # (slow and noisy) where TF happens to be installed.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))
        from torch.utils.tensorboard import SummaryWriter

        if not settings.run.resume or not (run_dir / rundir.CONFIG).is_file():
            save_config(settings.flat(), run_dir / rundir.CONFIG)  # a resume appends its changes
        run.writer = SummaryWriter(str(run_dir / rundir.TENSORBOARD))
    if rt.is_master:
        print(describe(run))
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


def describe(run: Run) -> str:
    """What will train, in one line."""
    s, rt = run.plan.settings, run.rt
    scaled = f" ({s.schedule.lr_max:g} x {rt.replicas} replicas)" if s.schedule.scale_lr else ""
    return (
        f"{s.model.model}: {len(run.train_set)} train / {len(run.val_set)} validation images, "
        f"{run.steps} steps of {run.global_batch} per epoch ({s.optim.batch_size} per replica) "
        f"on {rt.replicas} {rt.kind} replica(s) ({rt.parallel}); peak lr "
        f"{run.schedule.lr_max:.3g}{scaled} per {s.optim.lr_update}; {run.plan.image_size}px, "
        f"{s.run.precision}; augment {s.augment.augment_preset}, mixing "
        f"{mix.describe(run.trainer.mixing)}, EMA {s.optim.ema_decay or 'off'}"
    )


def _score(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


def _improves(score: float, best: float) -> bool:
    """A NaN score (an AUC where no class has both labels in the fold) is -inf: until a finite
    score appears, the latest epoch is the best, so best.pt and oof.csv always exist."""
    return _score(score) > best or best == -math.inf


def train_epoch(run: Run, state: RunState) -> None:
    """Train `state.epoch` from `state.step` on, evaluate, and checkpoint; advances `state`."""
    started, first = time.time(), state.step
    train_loss, nonfinite, train_seconds = train_steps(run, state)
    average_buffers(run)  # every replica evaluates (and saves) the same model
    scores, probs = evaluate_epoch(run, state.epoch)
    row = {"epoch": state.epoch, "lr": run.lr_at(state.epoch), "train_loss": train_loss}
    row.update({k: v for k, v in scores.items() if not k.startswith("ema_")})
    row["nonfinite_steps"] = nonfinite
    row.update({k: v for k, v in scores.items() if k.startswith("ema_")})
    row["images_per_sec"] = (run.steps - first) * run.global_batch / train_seconds
    row["seconds"] = time.time() - started
    row["compiles"] = run.rt.compile_count() - run.compiles_counted
    run.compiles_counted += row["compiles"]
    row["cached_graphs"] = run.rt.cache_hits() - run.cache_hits_counted
    run.cache_hits_counted += row["cached_graphs"]
    state.history.append(row)
    key = f"val_{run.plan.metric.name}"
    improved = _improves(row[key], state.best_score)
    state.best_score = _score(row[key]) if improved else state.best_score
    ema_key = f"ema_{key}"
    improved_ema = ema_key in row and _improves(row[ema_key], state.best_ema_score)
    state.best_ema_score = _score(row[ema_key]) if improved_ema else state.best_ema_score
    # --patience: epochs in which neither the model nor its moving average improved.
    state.flat_epochs = 0 if improved or improved_ema else state.flat_epochs + 1
    state.epoch, state.step, state.epoch_loss_sum = state.epoch + 1, 0, 0.0
    state.epoch_nonfinite = state.epoch_nonfinite_run = state.epoch_skipped = 0
    write_epoch(run, state, improved, improved_ema)
    save_epoch(run, state, probs, improved=improved, improved_ema=improved_ema)


def train_steps(run: Run, state: RunState) -> tuple[float, int, float]:
    """The epoch's training steps from `state.step` on: (mean loss, non-finite steps skipped,
    seconds they took)."""
    settings, rt, epoch, started = run.plan.settings, run.rt, state.epoch, time.time()
    batches = train_batches(
        len(run.train_set),
        run.loader_batch,
        rt.loaders,
        rt.loader_rank,
        settings.run.seed,
        epoch,
        state.step,
    )
    every = settings.run.checkpoint_every

    def on_step(step: int) -> None:
        if every and step % every == 0 and step < run.steps:
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
            rundir.save_checkpoint(rt, run.plan.run_dir, rundir.LAST, snapshot(run, mid))

    # Called from a closure thread, possibly after the loop has moved on: epoch is bound.
    def log(step: int, loss: float, lr: float) -> None:
        if run.writer is not None:
            run.writer.add_scalar("train/loss", loss, epoch * run.steps + step)
            run.writer.add_scalar("train/lr", lr, epoch * run.steps + step)

    loader = BatchLoader(run.train_set, batches, settings.data.workers)
    train_loss = run.trainer.train_one_epoch(
        loader,
        epoch=epoch,
        steps=run.steps,
        start_step=state.step,
        lr_at=run.lr_at,
        on_step=on_step,
        log=log,
        log_every=settings.run.log_every,
        loss_sum=state.epoch_loss_sum,
        nonfinite=(state.epoch_nonfinite, state.epoch_nonfinite_run),
    )
    seconds = time.time() - started
    nonfinite = run.trainer.nonfinite_steps()
    if nonfinite and rt.is_master:
        print(
            f"warning: epoch {epoch}: skipped {nonfinite} step(s) with a non-finite loss or "
            "gradients (they changed no weights)"
        )
    check_skipped(run, loader.skipped, epoch, before=state.epoch_skipped)
    return train_loss, nonfinite, seconds


def evaluate_epoch(run: Run, epoch: int) -> tuple[dict[str, float], dict[bool, np.ndarray]]:
    """The validation columns of the epoch's history row, and the validation predictions of
    the model (key False) and of its moving average (True, with --ema-decay)."""
    plan, rt = run.plan, run.rt
    val_targets = plan.data.train.targets[plan.val_index]
    row, probs = {}, {}
    for ema in [False] + ([True] if run.trainer.ema is not None else []):
        batches = eval_batches(len(run.val_set), run.eval_batch, rt.loaders, rt.loader_rank)
        loader = BatchLoader(run.val_set, batches, plan.settings.data.workers)
        probs[ema], loss = run.trainer.evaluate(loader, len(run.val_set), ema=ema)
        prefix = "ema_" if ema else ""
        row[f"{prefix}val_loss"] = loss
        row.update(
            validation_scores(plan.metric, val_targets, probs[ema], plan.data.classes, prefix)
        )
    return row, probs


def save_epoch(
    run: Run, state: RunState, probs: dict[bool, np.ndarray], *, improved: bool, improved_ema: bool
) -> None:
    """best.pt / best_ema.pt with their out-of-fold predictions where they improved, then
    last.pt: a kill at any point leaves a run folder that resumes."""
    plan, rt = run.plan, run.rt
    val_ids = [plan.data.train.ids[i] for i in plan.val_index]
    for better, ema, name, oof_name in [
        (improved, False, rundir.BEST, rundir.OOF),
        (improved_ema, True, rundir.BEST_EMA, rundir.OOF_EMA),
    ]:
        if not better:
            continue
        best = weights_only(snapshot(run, state), ema=ema)
        rundir.save_checkpoint(rt, plan.run_dir, name, best)
        if rt.is_host_writer:
            if not ema:
                rundir.commit_overwrite(plan.run_dir)  # the old run --overwrite kept can go
            oof = pd.DataFrame(probs[ema], columns=plan.data.classes)
            oof.insert(0, "image_id", val_ids)
            atomic_to_csv(oof, plan.run_dir / oof_name)
    rundir.save_checkpoint(rt, plan.run_dir, rundir.LAST, snapshot(run, state))


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
    max_fraction = run.plan.settings.data.max_bad_fraction
    if count > max_fraction * samples:
        raise UserError(
            f"epoch {epoch}: {count} of {samples} training images cannot be decoded "
            f"({names}), more than --max-bad-fraction {max_fraction:g}; replace or remove them "
            f"(leaf-xla check lists them all) or raise the fraction"
        )
    if run.rt.is_master:
        print(f"warning: epoch {epoch}: skipped {count} unreadable training images: {names}")


def write_epoch(run: Run, state: RunState, improved: bool, improved_ema: bool) -> None:
    """history.csv and TensorBoard on each host, the epoch's line on the master."""
    row = state.history[-1]
    if run.rt.is_host_writer:
        atomic_to_csv(pd.DataFrame(state.history), run.plan.run_dir / rundir.HISTORY)
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


def finish(run: Run, state: RunState) -> None:
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
            plan.settings.optim.epochs,
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
    settings = plan.settings
    run = build(plan)
    state = restore(run) if settings.run.resume else RunState()
    check_replicas_agree(run, state)
    done = state.finished(settings.optim.epochs, settings.run.patience)
    if done:
        if run.rt.is_master:
            print(
                f"nothing to resume: {plan.run_dir} is finished ({done}); raise --epochs "
                "or --patience to train on"
            )
        run.rt.shutdown()
        return
    if settings.run.resume and run.rt.is_master:
        print(f"resuming {plan.run_dir} at epoch {state.epoch} step {state.step}")
    announce(run)
    run.compiles_counted = run.rt.compile_count()
    run.cache_hits_counted = run.rt.cache_hits()
    with run.rt.watched(settings.launch.dist_timeout):
        while not state.finished(settings.optim.epochs, settings.run.patience):
            train_epoch(run, state)
    patience = settings.run.patience
    if patience and state.flat_epochs >= patience and run.rt.is_master:
        print(
            f"early stop: no better validation {plan.metric.shown} for {state.flat_epochs} epochs"
        )
    finish(run, state)
    run.rt.shutdown()


if __name__ == "__main__":  # the command is leaf_xla/commands/train.py
    not_a_command("leaf_xla.train", "train")
