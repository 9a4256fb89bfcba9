"""Probes and faults for the multi-process tests, in every Python process they start.

Tests put this folder on PYTHONPATH, so Python imports this module at start-up in the CLI
process and in every replica it spawns. Nothing happens unless a variable asks for it:

- LEAF_XLA_TEST_RECORD=DIR: each replica appends the images it loads to DIR/seen-rank<R>.txt
  ("<file name> <augmentation seed or None>") and, at every checkpoint save, writes its own copy
  of the model state to DIR/<checkpoint name>-rank<R>.pt (all replicas, not only the writer),
  and of its moving average (--ema-decay) to DIR/<checkpoint name>-ema-rank<R>.pt.
- LEAF_XLA_TEST_FAULT=RANK:KIND:N[:COUNT]: on replica RANK only, KIND=enospc makes the N-th
  write of a last.pt fail with ENOSPC; KIND=nan makes the loss of its N-th training step NaN
  (and of the COUNT - 1 steps after it: COUNT defaults to 1); KIND=nanbuffer makes a BatchNorm
  statistic NaN in those steps' forward pass instead, the loss staying finite; KIND=hang makes
  its N-th training step wait for an hour (a replica stuck in a collective).
"""

from __future__ import annotations

import os

_record = os.environ.get("LEAF_XLA_TEST_RECORD")
_fault = os.environ.get("LEAF_XLA_TEST_FAULT")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _install_record(folder: str) -> None:
    import threading

    import torch

    from leaf_xla import checkpoint, loader

    lock = threading.Lock()
    fill, save = loader.LeafImages.fill, checkpoint.save

    def recording_fill(self, key, out):
        filled = fill(self, key, out)
        position, aug_seed = key
        name = self.paths[position].name if position < len(self.paths) else "<pad>"
        with lock, open(os.path.join(folder, f"seen-rank{_rank()}.txt"), "a") as handle:
            handle.write(f"{name} {aug_seed}\n")
        return filled

    def recording_save(rt, path, state, **kwargs):
        mine = rt.to_cpu(state["model"])
        torch.save(mine, os.path.join(folder, f"{path.name}-rank{_rank()}.pt"))
        if "ema" in state:  # --ema-decay: the moving average, as this replica holds it
            ema = rt.to_cpu(state["ema"])
            torch.save(ema, os.path.join(folder, f"{path.name}-ema-rank{_rank()}.pt"))
        save(rt, path, state, **kwargs)

    loader.LeafImages.fill = recording_fill
    checkpoint.save = recording_save


def _install_fault(spec: str) -> None:
    import errno

    import torch

    from leaf_xla import engine

    rank, kind, count, *repeat = spec.split(":")
    last = int(count) + int(repeat[0] if repeat else 1) - 1
    calls = {"n": 0}

    def mine() -> bool:
        return _rank() == int(rank)

    if kind == "enospc":
        real_save = torch.save

        def failing_save(obj, f, *args, **kwargs):
            if mine() and ".last.pt." in str(f):
                calls["n"] += 1
                if calls["n"] == int(count):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = failing_save
    elif kind == "hang":
        import time

        loss = engine.Trainer.loss

        def hanging_loss(self, logits, targets):
            if mine() and self.model.training:
                calls["n"] += 1
                if calls["n"] == int(count):
                    time.sleep(3600)
            return loss(self, logits, targets)

        engine.Trainer.loss = hanging_loss
    elif kind in ("nan", "nanbuffer"):
        loss = engine.Trainer.loss

        def nan_loss(self, logits, targets):
            value = loss(self, logits, targets)
            if mine() and self.model.training:
                calls["n"] += 1
                if int(count) <= calls["n"] <= last and kind == "nan":
                    return value + float("nan")
                if int(count) <= calls["n"] <= last:  # a new tensor: autograd saved the old
                    for module in self.model.modules():
                        if getattr(module, "running_var", None) is not None:
                            module.running_var = torch.full_like(module.running_var, float("nan"))
                            break
            return value

        engine.Trainer.loss = nan_loss
    else:
        raise ValueError(f"LEAF_XLA_TEST_FAULT: unknown kind {kind!r}")


if _record:
    _install_record(_record)
if _fault:
    _install_fault(_fault)
