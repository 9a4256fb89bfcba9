"""The optimizer update of the compiled train step, kept only where it is finite.

A non-finite step changes nothing: where the averaged gradients, any replica's loss or
BatchNorm statistics, or the updated weights are not finite, the weights, BatchNorm
statistics, optimizer state (Adam's step count included) and moving average stay bitwise as
they were. The decision is made inside the compiled graph (no host sync) and reduced over the
replicas, so that every replica takes the same one.

On a TPU the host traces every step in Python while the device runs the one before, so what
the guard costs is counted in dispatched ops (`bench/host_cost.py`):

- `FoundInfUpdate`, for the optimizers `create_optimizer` builds: torch_xla's sync-free
  optimizers on XLA (one fused update per parameter, no aten op) and torch's fused Adam/AdamW on
  CPU and CUDA take a `found_inf` flag and skip the update themselves. That the new weights are
  finite is checked on a trial update of copies first. About 5 ops per parameter tensor and 4
  per buffer, where torch's Adam alone dispatches 13 per parameter on XLA.
- `GuardedUpdate`, for any other optimizer: copies of everything the update changes, put back
  with `torch.where` (about 12 ops per parameter tensor on top of the optimizer's own).

Finiteness is checked on each tensor's sum (one op per tensor): a non-finite element makes the
sum non-finite; so does, rarely, a sum of finite values beyond float32's range, a step that has
diverged anyway.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from leaf_xla.backends.base import Runtime
from leaf_xla.ema import WeightEma


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One 0-d bool on the device: every element of every tensor is finite (see above)."""
    sums = [t.sum(dtype=torch.float32) for t in tensors]
    return torch.isfinite(torch.stack(sums)).all()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    """The optimizer's state tensors (moments, Adam's step), by (parameter id, name)."""
    return {
        (id(p), name): value
        for group in optimizer.param_groups
        for p in group["params"]
        for name, value in optimizer.state.get(p, {}).items()
        if isinstance(value, torch.Tensor)
    }


def fit_loaded_state(
    optimizer: torch.optim.Optimizer, device: torch.device, fused: bool = False
) -> None:
    """The optimizer state as the update needs it, also when loaded from a checkpoint of
    another device or optimizer: Adam's step count on the device (torch's `capturable` on XLA
    and CUDA, where torch keeps it on the host by default; the CPU refuses it), so that a
    skipped step can put it back inside the graph; the sync-free Adam's `max_exp_avg_sq`
    placeholder where torch's Adam saved none; the sync-free SGD's momentum buffer (made
    before the first step) and a step count beside a buffer torch's SGD saved; `fused`: torch's
    fused kernels, which a state saved by another optimizer (XLA's sync-free one) would turn
    off, since loading replaces the parameter groups' settings. After the first step, a
    no-op."""
    syncfree = _syncfree_types()
    syncfree_adam = isinstance(optimizer, syncfree[:2])
    syncfree_sgd = isinstance(optimizer, syncfree[2:])
    for group in optimizer.param_groups:
        if fused:
            group["fused"], group["foreach"] = True, None
        if "capturable" in group and not group.get("fused"):
            group["capturable"] = device.type != "cpu"
        for p in group["params"]:
            state = optimizer.state[p] if syncfree_sgd else optimizer.state.get(p, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                state["step"] = step.to(p.device, torch.float32)
            if syncfree_adam and "exp_avg" in state and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.empty(0, device=p.device)
            if syncfree_sgd:  # torch's SGD saves no step; the sync-free SGD's step 0 means "new"
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state.pop("step", None)
                elif "step" not in state:
                    state["step"] = torch.ones((), device=p.device)


class BufferSnapshot:
    """The model's buffers (BatchNorm statistics) as they were before the forward pass.

    Each buffer is swapped for a copy that the forward pass updates (or replaces);
    `keep_unless` then chooses between the buffer the module now holds and the one before, by
    reference: no copy back. A buffer shared by several modules stays shared."""

    def __init__(self, model: torch.nn.Module):
        self.slots: list[tuple[torch.nn.Module, str, int]] = []
        self.before: dict[int, torch.Tensor] = {}
        copies: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is None:
                    continue
                key = id(buffer)
                if key not in self.before:
                    self.before[key] = buffer
                    copies[key] = buffer.clone()
                self.slots.append((module, name, key))
                module._buffers[name] = copies[key]

    def now(self) -> dict[int, torch.Tensor]:
        """Each buffer as the forward pass left it."""
        return {key: module._buffers[name] for module, name, key in self.slots}

    def floats(self) -> list[torch.Tensor]:
        return [t for t in self.now().values() if t.is_floating_point()]

    def keep_unless(self, ok: torch.Tensor) -> None:
        now = self.now()
        chosen = {k: torch.where(ok, now[k], self.before[k]) for k in now}
        for module, name, key in self.slots:
            module._buffers[name] = chosen[key]


class GuardedUpdate:
    """Average the gradients and step any torch optimizer, unless the step is not finite.

    `begin()` before the forward pass (which updates BatchNorm's statistics), `step(loss)`
    after the backward pass."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        rt: Runtime,
        ema: WeightEma | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.rt = rt
        self.ema = ema
        self.buffers: BufferSnapshot | None = None

    def begin(self) -> None:
        self.buffers = BufferSnapshot(self.model)

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def agree(self, ok: torch.Tensor) -> torch.Tensor:
        """Every replica's verdict, reduced: one replica's non-finite loss or BatchNorm
        statistics stop the step on all of them."""
        return self.rt.all_reduce(ok.float(), "min") > 0

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Update the weights unless anything is not finite; the verdict (0-d bool)."""
        self.rt.reduce_gradients(self.optimizer)
        fit_loaded_state(self.optimizer, self.rt.device)
        params = self.params()
        grads = [p.grad for p in params if p.grad is not None]
        ok = all_finite([loss, *grads, *self.buffers.floats()])
        kept_params = [p.detach().clone() for p in params]
        kept_state = {k: v.clone() for k, v in optimizer_tensors(self.optimizer).items()}
        self.optimizer.step()
        ok = self.agree(ok & all_finite(params))
        with torch.no_grad():
            for p, before in zip(params, kept_params):
                p.copy_(torch.where(ok, p, before))
            for key, now in optimizer_tensors(self.optimizer).items():
                before = kept_state.get(key)  # None: state the step created, zeros before it
                before = torch.zeros_like(now) if before is None else before
                now.copy_(torch.where(ok, now, before))
        self.finish(ok)
        return ok

    def finish(self, ok: torch.Tensor) -> None:
        """BatchNorm statistics, then the moving average (of the weights as they now are)."""
        self.buffers.keep_unless(ok)
        self.buffers = None
        if self.ema is not None:
            self.ema.update(self.model, ok)


def _syncfree_types() -> tuple[type, ...]:
    """torch_xla's sync-free Adam, AdamW and SGD, where this process uses torch_xla (importing
    it elsewhere would configure a PJRT device as a side effect)."""
    if "torch_xla" not in sys.modules:
        return ()
    from torch_xla.amp import syncfree

    return (syncfree.Adam, syncfree.AdamW, syncfree.SGD)


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """An optimizer that skips its own update where a `found_inf` flag is set."""
    if isinstance(optimizer, _syncfree_types()):
        return True
    fused = all(group.get("fused") for group in optimizer.param_groups)
    # torch's fused SGD leaves an uninitialised momentum buffer after a skipped first step.
    return fused and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)


def step_with_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()`, skipped (bitwise) where `found_inf` (0-d float) is 1."""
    if isinstance(optimizer, _syncfree_types()):
        optimizer.step(found_inf=found_inf)
        return
    optimizer.found_inf = found_inf  # torch's fused optimizers read it, as GradScaler sets it
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class FoundInfUpdate(GuardedUpdate):
    """For optimizers that skip their own update on a flag: nothing is copied but what a trial
    update needs to show that the new weights are finite."""

    def trial_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The weights this step would give, computed on copies; nothing real changes."""
        state = self.optimizer.state
        saved_state = {p: dict(state[p]) for p in params if p in state}
        saved_data = [p.data for p in params]
        for p in params:
            p.data = p.data.clone()
            for name, value in state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.numel():  # not the empty placeholder
                    state[p][name] = value.clone()
        step_with_found_inf(self.optimizer, torch.zeros((), device=self.rt.device))
        trial = [p.data for p in params]
        for p, data in zip(params, saved_data):
            p.data = data
            if p in saved_state:
                state[p] = saved_state[p]
            else:
                state.pop(p, None)
        return trial

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        self.rt.reduce_gradients(self.optimizer)
        syncfree = isinstance(self.optimizer, _syncfree_types())
        fit_loaded_state(self.optimizer, self.rt.device, fused=not syncfree)
        params = [p for p in self.params() if p.grad is not None]
        # A non-finite gradient makes the trial weights non-finite: one check covers both.
        trial = self.trial_params(params)
        ok = self.agree(all_finite([loss, *self.buffers.floats(), *trial]))
        step_with_found_inf(self.optimizer, (~ok).float())
        self.finish(ok)
        return ok


def create_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, ema: WeightEma | None
) -> GuardedUpdate:
    kind = FoundInfUpdate if supports_found_inf(optimizer) else GuardedUpdate
    return kind(model, optimizer, rt, ema)
