"""Checkpoints: atomic, one copy per host, loadable without unpickling code, enough to resume.

A checkpoint holds the model and optimizer state, the position in the schedule (epoch and step
within it), every RNG state, the best score so far, the history, the resolved config and what
prediction needs (classes, image size, mean, std).
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaf_xla.cli import UserError
from leaf_xla.files import atomic_path
from leaf_xla.runtime import Runtime

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


PREVIOUS = {"last.pt": "last.prev.pt"}  # the checkpoints whose previous copy is kept


def save(rt: Runtime, path: Path, state: dict[str, Any]) -> None:
    """Every replica calls this; one process per host writes, so that every host's disk holds
    the checkpoint (pods have no shared disk).

    Two phases: each host writes a temp file, all replicas meet, then each host renames. A
    host that fails to write (a full disk) fails the meeting for all, and no host replaces
    its previous checkpoint: the hosts keep agreeing on what they hold. The meeting is
    outside the writer test on purpose: a rank-dependent collective would hang the others.
    The previous last.pt stays as last.prev.pt, so a resume has a second chance when the
    newer one is unreadable.
    """
    cpu_state = rt.to_cpu(state) if rt.is_host_writer else None
    with contextlib.ExitStack() as stack:
        if rt.is_host_writer:
            previous = path.with_name(PREVIOUS[path.name]) if path.name in PREVIOUS else None
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
                f"could run code): not a leaf_xla checkpoint ({_first_line(err)})"
            )
        except (RuntimeError, EOFError, zipfile.BadZipFile) as err:  # torch's zip reader
            problem = f"is corrupt ({_first_line(err)})"
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} {problem}")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a leaf_xla checkpoint (no model/config inside)")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


def load_for_resume(run_dir: Path, warn: bool = True) -> tuple[dict[str, Any], Path]:
    """The state to resume `run_dir` from: last.pt, else (with a warning) last.prev.pt.

    `warn=False` where the warning was given already (train.prepare loads it first).

    best.pt is no fallback: it holds no optimizer state, and resuming from it would replay
    the epochs after it with another optimizer.
    """
    last, previous = run_dir / "last.pt", run_dir / PREVIOUS["last.pt"]
    try:
        return load(last), last
    except CheckpointError as err:
        if not previous.is_file():
            raise CheckpointError(
                f"--resume: {err}, and there is no {previous.name} to fall back on "
                f"(best.pt holds no optimizer state, so no option resumes from it): start "
                "again with --overwrite, or another --run-name to keep this folder"
            ) from None
        first = str(err)
    try:
        state = load(previous)
    except CheckpointError as err:
        raise CheckpointError(
            f"--resume: {first}; the fallback {err} too (best.pt holds no optimizer state, so "
            "no option resumes from it): start again with --overwrite, or another --run-name"
        ) from None
    if warn:
        print(
            f"warning: {first}; resuming from {previous} (epoch {state['epoch']} step "
            f"{state['step']}), the checkpoint saved before it",
            file=sys.stderr,
        )
    return state, previous


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
