"""Checkpoints: atomic, one copy per host, loadable without unpickling code, enough to resume.

A checkpoint holds the model and optimizer state, the position in the schedule (epoch and step
within it), every RNG state, the best score so far, the history, the resolved config and what
prediction needs (classes, image size, mean, std).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaf_xla.cli import UserError
from leaf_xla.files import atomic_path
from leaf_xla.runtime import Runtime


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


def save(rt: Runtime, path: Path, state: dict[str, Any]) -> None:
    """Every replica calls this; one process per host writes, so that every host's disk holds
    the checkpoint (pods have no shared disk).

    Two phases: each host writes a temp file, all replicas meet, then each host renames. A
    host that fails to write (a full disk) fails the meeting for all, and no host replaces
    its previous checkpoint: the hosts keep agreeing on what they hold. The meeting is
    outside the writer test on purpose: a rank-dependent collective would hang the others.
    """
    cpu_state = rt.to_cpu(state) if rt.is_host_writer else None
    with contextlib.ExitStack() as stack:
        if rt.is_host_writer:
            tmp = stack.enter_context(atomic_path(path))
            torch.save(cpu_state, tmp)
        rt.barrier(f"leaf_xla.save.{path.name}")


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint; a truncated or foreign file is a one-line error naming it."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and EOF errors share no base class
        raise UserError(
            f"checkpoint {path} is unreadable ({str(err).splitlines()[0][:120]}); it may be "
            "truncated: use the other of last.pt/best.pt or start again without --resume"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a leaf_xla checkpoint (no model/config inside)")
    return state
