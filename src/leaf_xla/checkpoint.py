"""Checkpoints: atomic, one copy per host, loadable without unpickling code, enough to resume.

A checkpoint holds the model and optimizer state (`model`, `optimizer`, `ema`), the run's state
(`RunState`'s fields: the position in the schedule, the best score so far, the history), every
RNG state (`rng`), the run's settings (`config`, `resume_identity`) and what prediction needs
(`classes`, `label_format`, `model_name`, `image_size`, `mean`, `std`). Fields added in later
versions are read with their old meaning where they are missing (`run_state`, `saved_best`).
Which checkpoints a run folder holds, and their names, is rundir's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaf_xla.backends.base import Runtime
from leaf_xla.errors import UserError, first_line
from leaf_xla.files import atomic_path
from leaf_xla.metrics import Metric

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6: a zip archive


def plain_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states as tensors and plain values, so that torch.load(weights_only=True) takes them."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {
        **state,
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def restore_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {
        **state,
        "python": (version, tuple(internal.tolist()), gauss),
        "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
    }


def save(rt: Runtime, path: Path, state: dict[str, Any], previous: Path | None = None) -> None:
    """Every replica calls this; one process per host writes, so that every host's disk holds
    the checkpoint (pods have no shared disk).

    Two phases: each host writes a temp file, all replicas meet, then each host renames. A
    host that fails to write (a full disk) fails the meeting for all, and no host replaces
    its previous checkpoint: the hosts keep agreeing on what they hold. The meeting is
    outside the writer test on purpose: a rank-dependent collective would hang the others.
    `previous`: where the file `path` replaces is kept (last.pt's: last.prev.pt, so that a
    resume has a second chance when the newer one is unreadable).
    """
    cpu_state = rt.to_cpu(state) if rt.is_host_writer else None
    with contextlib.ExitStack() as stack:
        if rt.is_host_writer:
            tmp = stack.enter_context(atomic_path(path, previous=previous))
            torch.save(cpu_state, tmp)
        rt.barrier(f"leaf_xla.save.{path.name}")


class CheckpointError(UserError):
    """A checkpoint file that cannot be used, with what is wrong with it."""


def _unreadable(path: Path) -> str | None:
    """What is wrong with the file as a PyTorch archive, judged from its bytes (None: nothing)."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (a crash during its save?)"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != ZIP_MAGIC:
        return "is not a PyTorch checkpoint (not a zip archive)"
    if not zipfile.is_zipfile(path):
        return f"is truncated ({size} bytes, the end of the archive is missing)"
    return None


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint; whatever is wrong with it is a one-line `CheckpointError` naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    problem = _unreadable(path)
    if problem is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            problem = (
                "holds pickled Python objects besides tensors, which are not loaded (they "
                f"could run code): not a leaf_xla checkpoint ({first_line(err, 120)})"
            )
        except (RuntimeError, EOFError, zipfile.BadZipFile) as err:  # torch's zip reader
            problem = f"is corrupt ({first_line(err, 120)})"
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} {problem}")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a leaf_xla checkpoint (no model/config inside)")
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """`model.load_state_dict`, with a head of another class count as a one-line error."""
    own = model.state_dict()
    wrong = [k for k, v in state["model"].items() if k in own and own[k].shape != v.shape]
    if wrong:
        saved = len(state.get("classes", []))
        raise CheckpointError(
            f"{path} does not fit this model: {wrong[0]} is {tuple(state['model'][wrong[0]].shape)}"
            f", the model's is {tuple(own[wrong[0]].shape)} (the checkpoint has {saved} classes"
            f" {state.get('classes')})"
        )
    model.load_state_dict(state["model"])


@dataclasses.dataclass
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
    history: list[dict] = dataclasses.field(default_factory=list)

    def finished(self, epochs: int, patience: int) -> str | None:
        """Why the run is over, or None."""
        if patience and self.flat_epochs >= patience:
            return "stopped early"
        return f"trained {self.epoch} epochs" if self.epoch >= epochs else None

    def fields(self) -> dict[str, Any]:
        """The checkpoint's fields for this state."""
        return dataclasses.asdict(self)


def run_state(state: dict[str, Any], metric: Metric) -> RunState:
    """The RunState a checkpoint holds, scored by `metric`."""
    return RunState(
        epoch=state["epoch"],
        step=state["step"],
        epoch_loss_sum=state["epoch_loss_sum"],
        # Absent from checkpoints of older versions: counted from the resume on, as they did.
        epoch_nonfinite=state.get("epoch_nonfinite", 0),
        epoch_nonfinite_run=state.get("epoch_nonfinite_run", 0),
        epoch_skipped=state.get("epoch_skipped", 0),
        best_score=saved_best(state, metric, ema=False),
        best_ema_score=saved_best(state, metric, ema=True),
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


def weights_only(state: dict[str, Any], *, ema: bool = False) -> dict[str, Any]:
    """What prediction needs of a snapshot: the model's weights, or the moving average's as
    the model of a checkpoint of its own (best_ema.pt loads like best.pt)."""
    best = {k: v for k, v in state.items() if k not in ("optimizer", "ema")}
    if ema:
        best["model"] = state["ema"]
        best["best_score"] = state["best_ema_score"]
    return best
