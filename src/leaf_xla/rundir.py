"""Run folders: plain names, one process at a time, an `--overwrite` that loses nothing until the
new run has something to show, and a resume that refuses other settings.

- `<out-dir>/.<run>.lock`: an exclusive `flock` held for the life of the train (or recipe)
  process that owns the folder. It sits beside the folder, not in it, so that it covers the
  name through `--overwrite`'s move-aside and restore. The holder's pid is written inside.
- `<out-dir>/.<run>.overwritten`: the old run while `--overwrite` trains the new one. It is
  deleted once the new run folder holds a best.pt; any earlier end of the process (an error,
  an exit, or a kill, found at the next start) puts it back.
- `<run>/config.resumes.yaml`: one entry per resume, with the options that changed; the
  run's `config.yaml` stays as the run was started.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import fcntl
import functools
import hashlib
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from leaf_xla.checkpoint import load_for_resume
from leaf_xla.cli import UserError
from leaf_xla.files import atomic_write_text, fsync_path

RESUMES = "config.resumes.yaml"
# The training options that are not part of the run's identity (config.identity declares the
# others, where they are defined), each with why a resume may change it.
NOT_IN_IDENTITY = {
    "config": "its values are the other options'",
    "data_dir": "where the data is; its classes and folds are compared",
    "out_dir": "where the run is",
    "run_name": "where the run is",
    "metric": "which score picks best.pt; a resume under another one re-scores the history",
    "label_format": "how the labels are read; the classes are compared",
    "folds_file": "the digest of which images validate is compared",
    "n_folds": "the digest of which images validate is compared",
    "holdout": "the digest of which images validate is compared",
    "fold_seed": "the digest of which images validate is compared",
    "soft_targets": "the digest of the rows trained on is compared",
    "cache": "where the pixels come from, not which",
    "cache_dir": "where the pixels come from, not which",
    "workers": "decoding threads: the batches are the same",
    "skip_bad_images": "what stops the run, not what it trains",
    "max_bad_fraction": "what stops the run, not what it trains",
    "max_nonfinite_steps": "what stops the run, not what it trains",
    "pretrained": "the starting weights: a resume loads last.pt's",
    "pretrained_tag": "the starting weights: a resume loads last.pt's",
    "weights": "the starting weights: a resume loads last.pt's",
    "epochs": "how long: a resume may train on",
    "patience": "how long: a resume may train on",
    "batch_size": "the global batch (x replicas) is compared",
    "eval_batch_size": "evaluation covers every image once whatever its batch",
    "device": "where it runs; the global batch and precision are compared",
    "parallel": "where it runs; the global batch and precision are compared",
    "nprocs": "where it runs; the global batch and precision are compared",
    "nnodes": "where it runs; the global batch and precision are compared",
    "node_rank": "where it runs; the global batch and precision are compared",
    "master_addr": "where it runs; the global batch and precision are compared",
    "master_port": "where it runs; the global batch and precision are compared",
    "dist_timeout": "how long a replica waits",
    "compile_cache": "a cache of compiled graphs",
    "resume": "how this process starts",
    "force_resume": "how this process starts",
    "overwrite": "how this process starts",
    "checkpoint_every": "when state is saved, not what",
    "log_every": "what is printed",
}
# What older checkpoints, saved before `resume_identity`, are compared on (from their config).
LEGACY_KEYS = (
    *("seed", "optimizer", "weight_decay", "label_smoothing", "ema_decay", "augment_preset"),
    *("mixup", "cutmix", "mix_prob", "mixup_switch_prob", "lr_start", "lr_max", "lr_min"),
    *("ramp_epochs", "sustain_epochs", "decay", "scale_lr", "fold"),
)
# Options whose change says nothing about the run (how this process was asked to start).
NOT_RECORDED = {"resume", "force_resume", "overwrite", "config"}


def check_name(name: str, what: str = "--run-name") -> str:
    """A run folder name: one plain path component inside the output folder."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(
            f"{what} {name!r}: give a plain folder name (no '/', not '.' or '..'); "
            "runs are written inside --out-dir"
        )
    return name


class FolderLock:
    """An exclusive flock on a lock file, held until `release()` or the end of the process.

    flock belongs to the open file: children started with spawn (fork + exec) do not inherit
    the descriptor (Python opens it non-inheritable), so the lock stays the launching parent's
    and no child can release it.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise UserError(
                f"{self.what} is in use by process {pid} on {host} (a train or recipe still "
                f"running on it; lock {self.path}): wait for it to end, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the file stays: unlinking it would let two lockers differ
            self.fd = None


_HELD: dict[Path, FolderLock] = {}


def hold_lock(path: Path, what: str) -> FolderLock:
    """Lock `path` for the rest of this process (again: the lock it already holds)."""
    key = path.resolve()
    if key not in _HELD:
        _HELD[key] = FolderLock(path, what).acquire()
    return _HELD[key]


def release_lock(path: Path) -> None:
    """Release a lock taken by `hold_lock` (for callers that run several jobs in one process)."""
    lock = _HELD.pop(path.resolve(), None)
    if lock is not None:
        lock.release()


def lock_run(run_dir: Path) -> FolderLock:
    return hold_lock(run_dir.with_name(f".{run_dir.name}.lock"), f"run folder {run_dir}")


def remove_stale_temps(run_dir: Path) -> int:
    """Delete the temp files of saves a kill cut short; only under the run's lock (a live run's
    temp files are in flight). Returns how many were removed."""
    stale = list(run_dir.glob(".*.tmp"))
    for path in stale:
        path.unlink()
    return len(stale)


class Overwrite:
    """`--overwrite` without losing the old run before the new one has saved a best.pt.

    `begin()` moves the old folder aside and starts an empty one; `commit()` deletes the old
    one (call it once best.pt is written; any process may: it acts on the folders); `finish()`
    (at exit, or the end of a `with` block) commits if best.pt exists, else puts the old run
    back. Use only under the run's lock.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.aside = run_dir.with_name(f".{run_dir.name}.overwritten")
        self.owner = os.getpid()

    def begin(self) -> Overwrite:
        os.rename(self.run_dir, self.aside)
        self.run_dir.mkdir()
        fsync_path(self.run_dir.parent)
        atexit.register(self.finish)
        return self

    def commit(self) -> None:
        if self.aside.exists():
            shutil.rmtree(self.aside)

    def restore(self) -> None:
        if not self.aside.exists():
            return
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        os.rename(self.aside, self.run_dir)
        fsync_path(self.run_dir.parent)
        print(
            f"{self.run_dir}: the new run saved no best.pt; the run that --overwrite had moved "
            "aside is back in place",
            file=sys.stderr,
        )

    def finish(self) -> None:
        if os.getpid() != self.owner:  # a forked child inherits atexit handlers: not its job
            return
        if (self.run_dir / "best.pt").is_file():
            self.commit()
        else:
            self.restore()

    def __enter__(self) -> Overwrite:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.finish()


def commit_overwrite(run_dir: Path) -> None:
    """The training loop's call after its first best.pt: the old run is no longer needed."""
    Overwrite(run_dir).commit()


def recover_overwrite(run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Settle an `--overwrite` that a kill cut short (its aside folder is still there).

    A new run that saved best.pt replaces the old one; one that saved no state is undone (the
    old run put back). One that saved a last.pt but no best.pt is newer than the old run:
    `--resume --overwrite` continues it (the old run is deleted once it saves best.pt),
    `--overwrite` starts again; anything else is refused, so that neither run is lost.
    """
    pending = Overwrite(run_dir)
    if not pending.aside.exists():
        return
    newer = not (run_dir / "best.pt").is_file() and any(
        (run_dir / name).is_file() for name in ("last.pt", "last.prev.pt")
    )
    if not newer or (overwrite and not resume):
        pending.finish()
    elif resume and overwrite:
        print(
            f"--resume --overwrite: resuming the run that --overwrite started in {run_dir}; "
            f"{pending.aside}, the run it replaces, is deleted once it saves best.pt",
            file=sys.stderr,
        )
    else:
        raise UserError(
            f"{run_dir} holds a run started with --overwrite that stopped before its first "
            f"best.pt, and {pending.aside} the run it was replacing: pass --resume --overwrite "
            f"to continue the new run (the old one is deleted once it saves best.pt), "
            f"--overwrite to start again, or delete {run_dir} to go back to the old run"
        )


def fold_digest(ids: Sequence[str], val_index: np.ndarray) -> str:
    """A digest of the fold assignment a run uses: which image ids validate (the rest train).

    From a whole fold array: `fold_digest(ids, np.flatnonzero(fold_of == fold))`.
    """
    validates = np.zeros(len(ids), dtype=bool)
    validates[val_index] = True
    lines = sorted(f"{image_id}\t{int(v)}" for image_id, v in zip(ids, validates))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@functools.cache
def train_identity_options() -> tuple[str, ...]:
    """The train options declared part of the run's identity (config.identity)."""
    from leaf_xla.config import identity_options
    from leaf_xla.train import build_parser  # train imports this module

    return tuple(identity_options(build_parser()))


def resume_identity(
    args: argparse.Namespace,
    *,
    classes: Sequence[str],
    image_size: int | str,
    fold_digest: str,
    soft_targets: str | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """What a resume must not change (store it in checkpoints as `resume_identity`): every
    option declared part of the identity, the resolved classes and image size, and digests.

    `soft_targets`: the digest of the `--soft-targets` rows trained on (None: the labels).
    `replicas`: None where the replica count is not known yet (before the runtime starts):
    the global batch is then left out.
    """
    identity = {
        **{k: getattr(args, k) for k in train_identity_options()},
        "classes": list(classes),
        "image_size": image_size,  # 512 as before for a square, "480x768" otherwise
        "fold_digest": fold_digest,
        "soft_targets": soft_targets,
    }
    if replicas is not None:
        identity["global_batch"] = args.batch_size * replicas
    return identity


def saved_identity(state: dict[str, Any]) -> dict[str, Any]:
    """The identity a checkpoint was saved with; older checkpoints: what their config holds."""
    if "resume_identity" in state:
        return state["resume_identity"]
    config = state["config"]
    legacy = {k: config[k] for k in LEGACY_KEYS if k in config}
    return {
        **legacy,
        "classes": state["classes"],
        "model": state["model_name"],
        "image_size": state["image_size"],
    }


def resume_diff(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: saved -> new` for each identity value both hold and that differs (a checkpoint
    of an older version holds fewer)."""
    diff = []
    for key in new:
        if key in saved and key in new and saved[key] != new[key]:
            if key == "fold_digest":
                diff.append("fold assignment: other validation images (the folds file changed)")
            elif key == "soft_targets":
                diff.append("soft targets: other training targets (--soft-targets changed)")
            else:
                diff.append(f"{key.replace('_', '-')}: {saved[key]!r} -> {new[key]!r}")
    return diff


def check_resume(state: dict[str, Any], new: dict[str, Any], path: Path, force: bool) -> list[str]:
    """Refuse a resume whose settings differ from the saved run's, unless forced (then return
    the differences). Another model or class count cannot be forced: the weights do not fit."""
    saved = saved_identity(state)
    diff = resume_diff(saved, new)
    if not diff:
        return diff
    shown = "; ".join(diff)
    if saved["model"] != new["model"] or len(saved["classes"]) != len(new["classes"]):
        raise UserError(f"--resume: {path} cannot continue as this run ({shown})")
    if not force:
        raise UserError(
            f"--resume: {path} was trained with other settings ({shown}); resume with its "
            "settings (see its config.yaml), or pass --force-resume to continue anyway"
        )
    return diff


def record_resume(
    run_dir: Path, args: argparse.Namespace, state: dict[str, Any], source: Path, forced: bool
) -> dict[str, Any]:
    """Append this resume (where from, which options changed) to config.resumes.yaml."""
    now = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    was = state["config"]
    changed = {
        key: {"was": was.get(key), "now": value}
        for key, value in now.items()
        if key not in NOT_RECORDED and was.get(key) != value
    }
    entry = {
        "resumed": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "from": source.name,
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
        "forced": forced,
        "changed": changed,
    }
    path = run_dir / RESUMES
    before = path.read_text() if path.is_file() else ""
    atomic_write_text(path, before + yaml.safe_dump([entry], sort_keys=False))
    return entry


def prepare_resume(run_dir: Path, args: argparse.Namespace, identity: dict[str, Any]) -> None:
    """Before a resume starts: refuse other settings (unless forced), then record the resume."""
    state, source = load_for_resume(run_dir)
    diff = check_resume(state, identity, source, force=args.force_resume)
    if diff:
        print(f"warning: --force-resume: {source}: {'; '.join(diff)}", file=sys.stderr)
    record_resume(run_dir, args, state, source, forced=bool(diff))
