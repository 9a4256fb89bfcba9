"""Run folders: plain names, one process at a time, an `--overwrite` that loses nothing until the
new run has something to show, and a resume that refuses other settings.

- `<out-dir>/.<run>.lock`: an exclusive `flock` held by the train (or recipe) process that owns
  the folder, until its run ends well (`fit()` returns) or the process ends. It sits beside the
  folder, not in it, so that it covers the name through `--overwrite`'s move-aside and
  restore. The holder's pid is written inside.
- `<out-dir>/.<run>.overwritten`: the old run while `--overwrite` trains the new one. It is
  deleted once the new run folder holds a best.pt; any earlier end of the process (an error,
  an exit, or a kill, found at the next start) puts it back.
- `<run>/config.resumes.yaml`: one entry per resume, with the options that changed; the
  run's `config.yaml` stays as the run was started.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import hashlib
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from leaf_xla.config import plain
from leaf_xla.errors import UserError
from leaf_xla.files import atomic_write_text, fsync_path
from leaf_xla.settings import DataSettings, TrainSettings

if TYPE_CHECKING:
    from leaf_xla.backends.base import Runtime

# What a run folder holds (<out-dir>/<model>-fold<k>), by name.
LAST = "last.pt"  # the whole state, saved at every epoch end (and --checkpoint-every)
LAST_PREVIOUS = "last.prev.pt"  # the last.pt before it: a resume's fallback
BEST = "best.pt"  # the weights (no optimizer) of the best epoch by the run's metric
BEST_EMA = "best_ema.pt"  # --ema-decay: the moving average's best, loadable like best.pt
OOF = "oof.csv"  # best.pt's predictions of the validation fold
OOF_EMA = "oof_ema.csv"
HISTORY = "history.csv"  # one row per epoch
CONFIG = "config.yaml"  # every setting as the run started (loadable with --config)
RESUMES = "config.resumes.yaml"  # what each resume changed
TENSORBOARD = "tb"
PLOTS = "plots"
FOLDS = "folds.csv"  # in <out-dir>: the folds every model of an ensemble shares
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
    """Release a lock taken by `hold_lock` (a process that runs several jobs, a notebook)."""
    lock = _HELD.pop(path.resolve(), None)
    if lock is not None:
        lock.release()


def lock_run(run_dir: Path) -> FolderLock:
    return hold_lock(_lock_path(run_dir), f"run folder {run_dir}")


def unlock_run(run_dir: Path) -> None:
    """The run is over: another process (or a later fit() here) may open its folder."""
    release_lock(_lock_path(run_dir))


def _lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


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
        if (self.run_dir / BEST).is_file():
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
    newer = not (run_dir / BEST).is_file() and any(
        (run_dir / name).is_file() for name in (LAST, LAST_PREVIOUS)
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


def resume_identity(
    settings: TrainSettings,
    *,
    classes: Sequence[str],
    image_size: int | str,
    fold_digest: str,
    soft_targets: str | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """What a resume must not change (store it in checkpoints as `resume_identity`): every
    setting of settings.IDENTITY, the resolved classes and image size, and digests.

    `soft_targets`: the digest of the `--soft-targets` rows trained on (None: the labels).
    `replicas`: None where the replica count is not known yet (before the runtime starts):
    the global batch is then left out.
    """
    identity = {
        **settings.identity(),
        "classes": list(classes),
        "image_size": image_size,  # 512 as before for a square, "480x768" otherwise
        "fold_digest": fold_digest,
        "soft_targets": soft_targets,
    }
    if replicas is not None:
        identity["global_batch"] = settings.optim.batch_size * replicas
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
    run_dir: Path, settings: TrainSettings, state: dict[str, Any], source: Path, forced: bool
) -> dict[str, Any]:
    """Append this resume (where from, which settings changed) to config.resumes.yaml."""
    now = plain(settings.flat())
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


def prepare_resume(run_dir: Path, settings: TrainSettings, identity: dict[str, Any]) -> None:
    """Before a resume starts: refuse other settings (unless forced), then record the resume."""
    state, source = load_for_resume(run_dir)
    diff = check_resume(state, identity, source, force=settings.run.force_resume)
    if diff:
        print(f"warning: --force-resume: {source}: {'; '.join(diff)}", file=sys.stderr)
    record_resume(run_dir, settings, state, source, forced=bool(diff))


def run_dir_of(settings: TrainSettings) -> Path:
    """<out-dir>/<run-name>, by default <model>-fold<k>."""
    name = settings.data.run_name or f"{settings.model.model}-fold{settings.data.fold}"
    return settings.data.out_dir / check_name(name)


def folds_file_of(data: DataSettings) -> Path:
    return data.folds_file or data.out_dir / FOLDS


def saved_folds_file(state: dict[str, Any], checkpoint_path: Path) -> Path:
    """The folds file the run of a checkpoint trained with (--split train re-predicts its fold)."""
    config = state["config"]
    folds_file = Path(config.get("folds_file") or Path(config["out_dir"]) / FOLDS)
    if folds_file.is_file():
        return folds_file
    # A relative path from another working directory, or a moved run folder: the default
    # folds file sits beside the run folder.
    beside = checkpoint_path.resolve().parent.parent / FOLDS
    if config.get("folds_file") or not beside.is_file():
        raise UserError(
            f"{checkpoint_path}: its folds file {folds_file} is gone; --split train needs it"
        )
    return beside


def open_run(run_dir: Path, settings: TrainSettings, identity: dict[str, Any]) -> None:
    """Lock the run folder for this process, then: a resume checked against the saved run's
    identity and recorded; a new run refused over checkpoints unless --overwrite (which keeps
    the old run aside until the new one has a best.pt)."""
    lock_run(run_dir)  # until this process ends: no other run touches the folder
    resume, overwrite = settings.run.resume, settings.run.overwrite
    recover_overwrite(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        if not any((run_dir / name).is_file() for name in (LAST, LAST_PREVIOUS)):
            raise UserError(f"--resume: {run_dir / LAST} not found")
        prepare_resume(run_dir, settings, identity)
        remove_stale_temps(run_dir)  # safe: the lock says no live run writes them
    elif run_dir.exists() and any(run_dir.glob("*.pt")):
        if not overwrite:
            raise UserError(
                f"{run_dir} already holds checkpoints: pass --resume to continue it, "
                "--overwrite to start again, or another --run-name"
            )
        Overwrite(run_dir).begin()  # the old run is deleted once best.pt is saved
    run_dir.mkdir(parents=True, exist_ok=True)


def save_checkpoint(rt: Runtime, run_dir: Path, name: str, state: dict[str, Any]) -> None:
    """Save one of the run's checkpoints (every replica calls it; see checkpoint.save)."""
    from leaf_xla import checkpoint  # torch: not for the commands that only name the files

    previous = run_dir / LAST_PREVIOUS if name == LAST else None
    checkpoint.save(rt, run_dir / name, state, previous=previous)


def load_for_resume(run_dir: Path, warn: bool = True) -> tuple[dict[str, Any], Path]:
    """The state to resume `run_dir` from: last.pt, else (with a warning) last.prev.pt.

    `warn=False` where the warning was given already (open_run loads it first).

    best.pt is no fallback: it holds no optimizer state, and resuming from it would replay
    the epochs after it with another optimizer.
    """
    from leaf_xla import checkpoint

    last, previous = run_dir / LAST, run_dir / LAST_PREVIOUS
    try:
        return checkpoint.load(last), last
    except checkpoint.CheckpointError as err:
        if not previous.is_file():
            raise checkpoint.CheckpointError(
                f"--resume: {err}, and there is no {previous.name} to fall back on "
                f"(best.pt holds no optimizer state, so no option resumes from it): start "
                "again with --overwrite, or another --run-name to keep this folder"
            ) from None
        first = str(err)
    try:
        state = checkpoint.load(previous)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(
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
