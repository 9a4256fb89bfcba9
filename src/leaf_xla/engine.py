"""The training engine: one compiled train step, one compiled eval step, and the epoch loops.

`Trainer` is the same code on every backend; what a strategy changes (gradient all-reduce,
gathering evaluation outputs, uploading batches, compiling) is a service of the `Runtime`
it is given (leaf_xla.backends), so this module imports no backend.

XLA discipline: batches have fixed shapes (loader.py); the step keeps no Python state that
changes per step, so it traces to the same graph every time; loss totals and the non-finite
counters live in device tensors that the host reads only at log points (asynchronously), at
mid-epoch checkpoints and at epoch end (intended syncs).

A non-finite step changes nothing (guard.py: the update is kept only where the gradients,
every replica's loss and BatchNorm statistics and the new weights are finite, decided inside
the compiled graph and the same on every replica). `max_nonfinite_steps` such steps in a row
stop training.

Determinism: the device generator (dropout, drop path) is seeded from (seed, epoch, step,
replica) before every step. XLA advances its seed at every graph cut, and a resumed run cuts
its graphs elsewhere than the killed one did (loading, its first batches), so a saved
generator state would not replay; a per-step seed makes it draw what the killed run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from leaf_xla import mix
from leaf_xla.backends.base import Runtime
from leaf_xla.ema import WeightEma
from leaf_xla.errors import UserError
from leaf_xla.guard import create_update
from leaf_xla.settings import MixSettings
from leaf_xla.tta import TTA_FLIPS


class NonFiniteLoss(UserError):
    pass


class EpochTotals(NamedTuple):
    """An epoch's totals so far (0-d device tensors)."""

    loss: torch.Tensor  # mean over replicas of the summed losses of the steps taken
    nonfinite_steps: torch.Tensor  # non-finite steps skipped
    stop_step: torch.Tensor  # where `max_nonfinite_steps` in a row were reached (-1: none)
    nonfinite_run: torch.Tensor  # the non-finite steps in a row that end the epoch so far


class Trainer:
    """Train and evaluate one model on one device."""

    def __init__(
        self,
        model: torch.nn.Module,
        rt: Runtime,
        *,
        multilabel: bool,
        mean: Sequence[float],
        std: Sequence[float],
        optimizer: torch.optim.Optimizer | None = None,
        label_smoothing: float = 0.0,
        tta: Sequence[str] = ("none",),
        seed: int = 0,
        mixing: MixSettings | None = None,
        ema_decay: float | None = None,
        max_nonfinite_steps: int = 3,
    ):
        self.rt = rt
        self.seed = seed
        self.model = model
        self.optimizer = optimizer
        self.multilabel = multilabel
        self.label_smoothing = label_smoothing
        self.max_nonfinite_steps = max_nonfinite_steps
        # Both fixed for the trainer's life: with them off the step traces exactly as before.
        self.mixing = mixing
        self.ema = WeightEma(model, ema_decay) if ema_decay is not None else None
        self.update = create_update(model, optimizer, rt, self.ema) if optimizer else None
        self.tta = [TTA_FLIPS[name] for name in tta]
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # uint8 -> normalised float in one multiply-add on the device: x * scale + shift.
        self.scale = (1.0 / (255.0 * std_t)).to(rt.device)
        self.shift = (-mean_t / std_t).to(rt.device)
        self._train_step = rt.compile(self.train_step, name="train_step")
        self._eval_step = rt.compile(self.eval_step, name="eval_step")
        self.steps_run: dict[str, int] = {}  # by kind, in this process: the first ones compile
        self.reset_totals()

    def epoch_totals(self) -> EpochTotals:
        """This epoch so far, on the device. The counts are the same on every replica: max
        taken to make sure."""
        return EpochTotals(
            loss=self.rt.all_reduce(self.loss_total, "mean"),
            nonfinite_steps=self.rt.all_reduce(self.bad_steps, "max"),
            stop_step=self.rt.all_reduce(self.stop_step, "max"),
            nonfinite_run=self.rt.all_reduce(self.bad_run, "max"),
        )

    # --- the compiled steps -----------------------------------------------------------------

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale + self.shift

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample loss in fp32: softmax cross-entropy, or sigmoid BCE for multi-label data."""
        logits = logits.float()
        if self.multilabel:
            if self.label_smoothing:  # towards 0.5, as timm's mixup_target smooths multi-label
                targets = targets * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
        return F.cross_entropy(
            logits, targets, label_smoothing=self.label_smoothing, reduction="none"
        )

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.update.begin()  # before the forward pass updates BatchNorm's statistics
        targets = batch["target"]
        with self.rt.autocast():
            images = self.normalize(batch["image"])
            if self.mixing is not None:  # element-wise ops: autocast leaves them fp32
                images, targets = mix.apply(images, targets, batch, self.rt.batch_shards)
            logits = self.model(images)
        # Masked mean: a sample skipped as unreadable (--skip-bad-images) weighs nothing.
        mask = batch["mask"]
        loss = (self.loss(logits, targets) * mask).sum() / mask.sum().clamp(min=1.0)
        loss.backward()
        loss = loss.detach()
        ok = self.update.step(loss)
        self.loss_total = self.loss_total + torch.where(ok, loss, torch.zeros_like(loss))
        self.bad_steps = self.bad_steps + (~ok).int()
        self.bad_run = torch.where(ok, torch.zeros_like(self.bad_run), self.bad_run + 1)
        stop = (self.bad_run >= self.max_nonfinite_steps) & (self.stop_step < 0)
        self.stop_step = torch.where(stop, self.step_counter, self.stop_step)
        # Training batches hold no padding: a masked sample is one skipped as unreadable.
        self.skipped_total = self.skipped_total + (mask == 0).sum(dtype=torch.int32)
        self.step_counter = self.step_counter + 1

    @torch.no_grad()
    def eval_step(
        self, batch: dict[str, torch.Tensor], model: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.normalize(batch["image"])
        probs, loss = None, None
        for dims in self.tta:
            with self.rt.autocast():
                logits = model(torch.flip(images, dims) if dims else images).float()
            if loss is None:
                loss = (self.loss(logits, batch["target"]) * batch["mask"]).sum()
            p = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
            probs = p if probs is None else probs + p
        return probs / len(self.tta), loss

    # --- the loops ---------------------------------------------------------------------------

    def beat(self, kind: str) -> None:
        """A step of `kind` (train, eval, ema) finished: the watchdog's clock restarts. The
        first two of each kind in this process compile (the first train step creates the
        optimizer state, the second runs the steady graph): the watchdog allows for that."""
        self.rt.heartbeat()
        self.steps_run[kind] = self.steps_run.get(kind, 0) + 1
        if self.steps_run[kind] < 2:
            self.rt.expect_compile()

    def expect_compile(self, kind: str) -> None:
        if kind not in self.steps_run:
            self.rt.expect_compile()

    def reset_totals(
        self, start_step: int = 0, loss_sum: float = 0.0, nonfinite: tuple[int, int] = (0, 0)
    ) -> None:
        """Start the epoch's totals at `start_step`; a resumed epoch with its loss and its
        non-finite steps so far (how many, and how many of them end it in a row)."""
        # Uploaded as data, not computed: no graph to compile, whatever the values.
        (
            self.loss_total,
            self.step_counter,
            self.bad_steps,
            self.bad_run,
            self.stop_step,
            self.skipped_total,
        ) = self.rt.upload(
            [
                torch.tensor(loss_sum, dtype=torch.float32),
                *(torch.tensor(v, dtype=torch.int32) for v in (start_step, *nonfinite, -1, 0)),
            ]
        )

    def skipped_images(self) -> int:
        """Training samples skipped as unreadable this epoch, over all replicas (a host sync:
        call between steps, on every replica)."""
        return int(self.rt.all_reduce(self.skipped_total, "sum").item())

    def nonfinite_steps(self) -> int:
        """Non-finite steps skipped this epoch so far (a host sync: call between steps, on
        every replica)."""
        return int(self.epoch_totals()[1].item())

    def check_finite(self, epoch: int) -> None:
        """Raise if `max_nonfinite_steps` steps in a row were non-finite (a host sync: call
        between steps). Every replica must call it: it is a collective, so all stop together.
        """
        stop = int(self.epoch_totals()[2].item())
        if stop >= 0:
            first = stop - self.max_nonfinite_steps + 1
            steps = f"step {stop}" if first == stop else f"steps {first} to {stop}"
            raise NonFiniteLoss(
                f"non-finite loss or gradients at epoch {epoch} {steps} "
                f"({self.max_nonfinite_steps} in a row, --max-nonfinite-steps; none changed "
                "the weights): training stopped, last.pt and best.pt hold the last good state; "
                "lower --lr or use fp32"
            )

    def step_seed(self, epoch: int, step: int) -> int:
        words = [self.seed, epoch, step, self.rt.seed_rank]
        return int(np.random.SeedSequence(words).generate_state(1)[0])

    def train_one_epoch(
        self,
        loader: Iterable[dict],
        *,
        epoch: int,
        steps: int,
        start_step: int,
        lr_at: Callable[[float], float],
        on_step: Callable[[int], None] | None = None,
        log: Callable[[int, float, float], None] | None = None,
        log_every: int = 20,
        loss_sum: float = 0.0,
        nonfinite: tuple[int, int] = (0, 0),
    ) -> float:
        """Train over `loader` (this epoch's batches from `start_step` on); the epoch's mean loss.

        `loss_sum`, `nonfinite`: the summed loss of steps before `start_step` (a resumed epoch)
        and its non-finite steps (how many, how many in a row at its end). `on_step(step)`
        runs after each step (mid-epoch checkpoints); `log(step, loss, lr)` gets the epoch's
        running mean loss every `log_every` steps, off the training thread.
        """
        self.model.train()
        # XLA compiles the step in this process's first epoch: said once, and the bar's rate
        # is timed from the step after it, not extrapolated from the compile.
        compiling = self.rt.compiles and "train" not in self.steps_run
        self.expect_compile("train")
        self.reset_totals(start_step, loss_sum, nonfinite)
        if self.mixing is not None:
            loader = mix.MixParams(
                loader,
                self.mixing,
                seed=self.seed,
                epoch=epoch,
                start_step=start_step,
                rank=self.rt.loader_rank,
            )
        bar = self._progress_bar(epoch, steps, start_step, compiling)
        step = start_step - 1
        with bar:  # cleared on errors too, so that an error message starts its own line
            for step, batch in enumerate(self.rt.device_loader(loader), start=start_step):
                if compiling and step == start_step + 2:  # the compiled step has run: time anew
                    bar.reset(total=steps)
                    bar.initial = bar.n = bar.last_print_n = step
                lr = lr_at(epoch + step / steps)
                self._set_lr(lr)
                self.rt.seed_device(self.step_seed(epoch, step))  # uploaded as data too
                self._train_step(batch)
                self.beat("train")
                bar.update(1)
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    self._log_later(step, lr, bar, log)
                if on_step is not None:
                    on_step(step + 1)
        if step + 1 != steps:  # never an epoch that ends early in silence
            raise RuntimeError(f"epoch {epoch}: the loader stopped at step {step + 1} of {steps}")
        self.check_finite(epoch)
        totals = self.epoch_totals()  # epoch end: intended sync
        return float(totals.loss.item()) / max(1, steps - int(totals.nonfinite_steps.item()))

    def _progress_bar(self, epoch: int, steps: int, start_step: int, compiling: bool) -> tqdm:
        bar = tqdm(
            total=steps,
            initial=start_step,
            desc=f"epoch {epoch}",
            unit="step",
            disable=not self.rt.is_master,
            dynamic_ncols=True,
            leave=False,
        )
        if compiling and self.rt.is_master:
            bar.write("compiling the training step, first time only")
        return bar

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            # A scalar XLA uploads as data (no recompilation per value), except 0 and 1, which
            # it folds into the graph as constants: one ulp away from them.
            group["lr"] = lr if lr not in (0.0, 1.0) else math.nextafter(lr, 0.5)

    def _log_later(
        self,
        step: int,
        lr: float,
        bar: tqdm,
        log: Callable[[int, float, float], None] | None,
    ) -> None:
        def report(loss_total: torch.Tensor, counter: torch.Tensor, bad: torch.Tensor) -> None:
            mean = float(loss_total.item()) / max(1, int(counter.item()) - int(bad.item()))
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", refresh=False)
            if log is not None:
                log(step, mean, lr)

        self.rt.after_step(report, (self.loss_total, self.step_counter, self.bad_steps))

    def evaluate(
        self, loader: Iterable[dict], n: int, *, ema: bool = False
    ) -> tuple[np.ndarray, float]:
        """Probabilities for samples 0..n-1 (each exactly once) and the mean loss, of the model
        or (`ema`) of its moving average."""
        model = self.ema.module if ema else self.model
        model.eval()
        kind = "ema" if ema else "eval"
        self.expect_compile(kind)
        probs, indices, losses = [], [], []
        for batch in self.rt.device_loader(loader):
            p, loss = self._eval_step(batch, model)
            self.beat(kind)
            probs.append(p)
            indices.append(batch["index"])
            losses.append(loss)
        # One graph and one transfer at the end (an intended sync), not one per batch.
        self.expect_compile(f"{kind}-gather")
        self.steps_run[f"{kind}-gather"] = 1
        probs_t = self.rt.all_gather(torch.cat(probs))
        index_t = self.rt.all_gather(torch.cat(indices))
        loss_t = self.rt.all_gather(torch.stack(losses).sum().view(1))
        self.rt.sync()
        all_probs, all_index = probs_t.cpu().numpy(), index_t.cpu().numpy()
        total_loss = float(loss_t.cpu().sum())
        out = np.full((n, all_probs.shape[1]), np.nan, dtype=np.float32)
        real = all_index >= 0
        if not np.isfinite(all_probs[real]).all():
            raise NonFiniteLoss(
                "evaluation produced non-finite probabilities: the weights are not finite; "
                "lower --lr or use fp32, and resume from a checkpoint saved before"
            )
        out[all_index[real]] = all_probs[real]
        if np.isnan(out).any() or real.sum() != n:
            raise RuntimeError(f"evaluation covered {int(real.sum())} of {n} samples")
        return out, total_loss / n


def create_optimizer(
    model: torch.nn.Module, name: str, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam as in the seed; AdamW and SGD (Nesterov momentum) as options.

    Each skips its own update where the step is not finite (guard.py): on XLA torch_xla's
    sync-free optimizers (one fused op per parameter), elsewhere torch's fused Adam/AdamW;
    SGD off XLA is torch's, guarded by copies."""
    params = list(model.parameters())
    on_xla = params[0].device.type == "xla"
    if name not in ("adam", "adamw", "sgd"):
        raise UserError(f"--optimizer must be adam, adamw or sgd, got {name!r}")
    if on_xla:
        from torch_xla.amp import syncfree

        if name == "sgd":
            optimizer = syncfree.SGD(
                params, lr=1e-5, momentum=0.9, nesterov=True, weight_decay=weight_decay
            )
            # Made before the first step: a skipped first step would otherwise keep the
            # buffer the sync-free SGD makes from that step's (non-finite) gradient.
            for p in params:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
            return optimizer
        kind = syncfree.Adam if name == "adam" else syncfree.AdamW
        return kind(params, lr=1e-5, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=1e-5, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return kind(params, lr=1e-5, weight_decay=weight_decay, fused=True)
