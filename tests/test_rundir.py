"""Run folders: plain names, the lock (from other processes, across spawned children, after a
kill), --overwrite's move-aside / commit / restore, stale temps, and the resume checks."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from leaf_xla import rundir
from leaf_xla.commands.options import train_settings
from leaf_xla.commands.train import build_parser
from leaf_xla.config import plain
from leaf_xla.errors import UserError
from leaf_xla.settings import IDENTITY, NOT_IN_IDENTITY, TrainSettings


@pytest.mark.parametrize("name", ["test_resnet-fold0", "b7.ns_jft_in1k-fold2", "my run"])
def test_plain_names_are_accepted(name):
    assert rundir.check_name(name) == name


@pytest.mark.parametrize("name", ["/tmp/x", "../x", "a/b", "..", ".", "", "a\\b"])
def test_names_outside_the_output_folder_are_refused(name):
    with pytest.raises(UserError, match="plain folder name"):
        rundir.check_name(name)


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


TRY_LOCK = """
    import sys
    from pathlib import Path
    from leaf_xla.cli import run
    from leaf_xla.rundir import lock_run
    run(lambda argv: lock_run(Path(sys.argv[1])) and print("locked"))
"""


def try_lock(run_dir: Path) -> subprocess.CompletedProcess:
    proc = python(TRY_LOCK, str(run_dir))
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture
def run_dir(tmp_path):
    folder = tmp_path / "runs" / "m-fold0"
    folder.mkdir(parents=True)
    yield folder
    rundir.release_lock(folder.with_name(".m-fold0.lock"))


def test_a_locked_run_folder_names_its_holder(run_dir):
    rundir.lock_run(run_dir)
    taken = try_lock(run_dir)
    assert taken.returncode == 2, taken.stderr
    assert f"run folder {run_dir} is in use by process {os.getpid()}" in taken.stderr
    assert "Traceback" not in taken.stderr and len(taken.stderr.splitlines()) == 1
    rundir.release_lock(run_dir.with_name(".m-fold0.lock"))
    free = try_lock(run_dir)
    assert free.returncode == 0 and free.stdout == "locked\n", free.stderr


def _spawned_child(run_dir: Path, queue) -> None:
    try:
        rundir.lock_run(run_dir)
        queue.put("locked")
    except UserError as err:
        queue.put(str(err))


def test_the_lock_stays_the_parents_across_spawned_children(run_dir):
    rundir.lock_run(run_dir)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_spawned_child, args=(run_dir, queue))
    child.start()
    answer = queue.get(timeout=120)
    child.join(timeout=60)
    assert f"in use by process {os.getpid()}" in answer
    # The child's exit released nothing: the folder is still the parent's.
    assert f"in use by process {os.getpid()}" in try_lock(run_dir).stderr


def test_a_killed_holder_leaves_the_folder_free(run_dir):
    holder = python(
        """
        import sys, time
        from pathlib import Path
        from leaf_xla.rundir import lock_run
        lock_run(Path(sys.argv[1])); print("held", flush=True); time.sleep(600)
        """,
        str(run_dir),
    )
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        assert f"in use by process {holder.pid}" in try_lock(run_dir).stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert try_lock(run_dir).returncode == 0


def an_old_run(run_dir: Path) -> dict[str, bytes]:
    (run_dir / "best.pt").write_bytes(b"old best")
    (run_dir / "last.pt").write_bytes(b"old last")
    (run_dir / "history.csv").write_text("epoch\n0\n")
    return contents(run_dir)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_overwrite_puts_the_old_run_back_when_the_new_one_fails(run_dir):
    old = an_old_run(run_dir)
    with pytest.raises(UserError, match="offline"):
        with rundir.Overwrite(run_dir):
            assert list(run_dir.iterdir()) == []
            (run_dir / "config.yaml").write_text("new: run\n")
            raise UserError("offline")
    assert contents(run_dir) == old
    assert not rundir.Overwrite(run_dir).aside.exists()


def test_overwrite_deletes_the_old_run_once_best_pt_is_saved(run_dir):
    an_old_run(run_dir)
    with rundir.Overwrite(run_dir) as overwrite:
        assert overwrite.aside.is_dir()
        (run_dir / "best.pt").write_bytes(b"new best")
        rundir.commit_overwrite(run_dir)  # what the training loop calls after its first best.pt
        assert not overwrite.aside.exists()
        (run_dir / "last.pt").write_bytes(b"new last")
    assert contents(run_dir) == {"best.pt": b"new best", "last.pt": b"new last"}


def test_a_new_best_pt_commits_at_the_end_even_without_the_call(run_dir):
    an_old_run(run_dir)
    with pytest.raises(MemoryError):
        with rundir.Overwrite(run_dir):
            (run_dir / "best.pt").write_bytes(b"new best")
            raise MemoryError  # a failure after the first best.pt: the new run stays
    assert contents(run_dir) == {"best.pt": b"new best"}
    assert not rundir.Overwrite(run_dir).aside.exists()


OVERWRITE_AND = """
    import os, signal, sys
    from pathlib import Path
    from leaf_xla.rundir import Overwrite, lock_run
    run_dir = Path(sys.argv[1])
    lock_run(run_dir)
    Overwrite(run_dir).begin()
    (run_dir / "config.yaml").write_text("new: run\\n")
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(2)
"""


def test_an_exit_before_best_pt_puts_the_old_run_back(run_dir):
    old = an_old_run(run_dir)
    proc = python(OVERWRITE_AND, str(run_dir), "exit")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "is back in place" in stderr
    assert contents(run_dir) == old


def test_a_kill_before_best_pt_is_settled_at_the_next_start(run_dir):
    old = an_old_run(run_dir)
    proc = python(OVERWRITE_AND, str(run_dir), "kill")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert contents(run_dir) == {"config.yaml": b"new: run\n"}
    rundir.lock_run(run_dir)
    rundir.recover_overwrite(run_dir)
    assert contents(run_dir) == old


def test_stale_temps_are_removed_and_outputs_kept(run_dir):
    (run_dir / ".last.pt.k1ll3d.tmp").write_bytes(b"half")
    (run_dir / "last.pt").write_bytes(b"whole")
    assert rundir.remove_stale_temps(run_dir) == 1
    assert contents(run_dir) == {"last.pt": b"whole"}


def test_the_fold_digest_follows_the_assignment_not_the_row_order():
    ids = [f"Train_{i}" for i in range(10)]
    fold_of = np.arange(10) % 3
    digest = rundir.fold_digest(ids, np.flatnonzero(fold_of == 0))
    order = np.random.default_rng(0).permutation(10)
    shuffled = rundir.fold_digest([ids[i] for i in order], np.flatnonzero(fold_of[order] == 0))
    assert shuffled == digest
    fold_of[1] = 0
    assert rundir.fold_digest(ids, np.flatnonzero(fold_of == 0)) != digest


def options(*argv: str) -> TrainSettings:
    return train_settings(
        build_parser().parse_args(["--model", "test_resnet", "--data-dir", "d", *argv])
    )


def identity(settings: TrainSettings, classes=("a", "b", "c"), replicas=1) -> dict:
    return rundir.resume_identity(
        settings, classes=classes, image_size=32, fold_digest="f0", replicas=replicas
    )


def saved(settings: TrainSettings, **kwargs) -> dict:
    config = plain(settings.flat())
    return {
        "config": config,
        "resume_identity": identity(settings, **kwargs),
        "epoch": 2,
        "step": 5,
    }


def test_a_resume_with_the_same_settings_passes():
    args = options("--seed", "3")
    assert (
        rundir.check_resume(saved(args), identity(options("--seed", "3")), Path("x"), False) == []
    )


def test_other_settings_are_refused_with_a_diff_unless_forced():
    state = saved(options("--seed", "3", "--batch-size", "8"))
    new = identity(options("--seed", "4", "--batch-size", "8", "--lr", "1e-3"), replicas=2)
    with pytest.raises(UserError) as caught:
        rundir.check_resume(state, new, Path("run/last.pt"), force=False)
    message = str(caught.value)
    assert "seed: 3 -> 4" in message and "lr-max: 5e-05 -> 0.001" in message
    assert "global-batch: 8 -> 16" in message and "--force-resume" in message
    forced = rundir.check_resume(state, new, Path("run/last.pt"), force=True)
    assert len(forced) == 3


def test_augmentation_and_mixing_are_part_of_the_identity():
    state = saved(options())
    new = identity(options("--mixup", "0.4", "--mix-prob", "0.5", "--augment-preset", "strong"))
    with pytest.raises(UserError) as caught:
        rundir.check_resume(state, new, Path("last.pt"), force=False)
    message = str(caught.value)
    assert "mixup: 0.0 -> 0.4" in message and "mix-prob: 1.0 -> 0.5" in message
    assert "augment-preset: 'seed' -> 'strong'" in message


@pytest.mark.parametrize(
    "argv, shown",
    [
        (("--lr-update", "epoch"), "lr-update: 'step' -> 'epoch'"),
        (("--augment", "[{Blur: {p: 0.5}}]"), "augment: [] -> [{'Blur': {'p': 0.5}}]"),
        (("--hflip", "0"), "hflip: 0.5 -> 0.0"),
        (("--vflip", "0"), "vflip: 0.5 -> 0.0"),
        (("--drop-rate", "0.3"), "drop-rate: 0.0 -> 0.3"),
        (("--drop-path-rate", "0.1"), "drop-path-rate: None -> 0.1"),
        (("--precision", "bf16"), "precision: 'fp32' -> 'bf16'"),
        (("--mean", "0.5", "0.5", "0.5"), "mean: None -> [0.5, 0.5, 0.5]"),
        (("--std", "0.2", "0.2", "0.2"), "std: None -> [0.2, 0.2, 0.2]"),
    ],
)
def test_every_setting_that_changes_the_weights_is_refused(argv, shown):
    with pytest.raises(UserError) as caught:
        rundir.check_resume(saved(options()), identity(options(*argv)), Path("x"), force=False)
    assert shown in str(caught.value)


def test_every_training_setting_is_in_the_identity_or_listed_as_harmless():
    """A new setting must be declared one or the other (settings.IDENTITY, NOT_IN_IDENTITY),
    and every train option is a setting of the same name."""
    options_ = {action.dest for action in build_parser()._actions if action.dest != "help"}
    fields = set(options().flat())
    assert options_ == fields
    assert IDENTITY.isdisjoint(NOT_IN_IDENTITY)
    assert fields - IDENTITY - set(NOT_IN_IDENTITY) == set(), "declare these"
    assert IDENTITY | set(NOT_IN_IDENTITY) <= fields, "no longer settings"
    assert IDENTITY <= set(identity(options()))


def test_another_class_count_cannot_be_forced():
    state = saved(options())
    new = identity(options(), classes=("a", "b", "c", "d"))
    with pytest.raises(UserError, match="cannot continue"):
        rundir.check_resume(state, new, Path("last.pt"), force=True)
    permuted = identity(options(), classes=("b", "a", "c"))
    with pytest.raises(UserError, match=r"classes: \['a', 'b', 'c'\] -> \['b', 'a', 'c'\]"):
        rundir.check_resume(state, permuted, Path("last.pt"), force=False)


def test_checkpoints_without_an_identity_are_checked_from_their_config():
    config = plain(options("--seed", "3", "--optimizer", "adam").flat())
    legacy = {"config": config, "classes": ["a", "b", "c"], "model_name": "test_resnet"}
    legacy["image_size"] = 32
    new = identity(options("--seed", "3", "--optimizer", "sgd"))
    with pytest.raises(UserError, match="optimizer: 'adam' -> 'sgd'"):
        rundir.check_resume(legacy, new, Path("last.pt"), force=False)


def test_each_resume_is_appended_to_the_record(tmp_path):
    state = saved(options("--seed", "3", "--epochs", "10"))
    rundir.record_resume(
        tmp_path, options("--seed", "3", "--epochs", "20"), state, Path("last.pt"), False
    )
    rundir.record_resume(
        tmp_path,
        options("--seed", "4", "--epochs", "10", "--resume"),
        state,
        Path("x/last.prev.pt"),
        True,
    )
    entries = yaml.safe_load((tmp_path / rundir.RESUMES).read_text())
    assert [e["changed"] for e in entries] == [
        {"epochs": {"was": 10, "now": 20}},
        {"seed": {"was": 3, "now": 4}},
    ]
    assert [(e["from"], e["epoch"], e["step"], e["forced"]) for e in entries] == [
        ("last.pt", 2, 5, False),
        ("last.prev.pt", 2, 5, True),
    ]


def test_prepare_resume_reads_the_fallback_and_records_it(tmp_path):
    args = options("--seed", "3")
    state = {**saved(args), "model": {}, "step": 0}
    torch.save(state, tmp_path / "last.prev.pt")
    (tmp_path / "last.pt").write_bytes(b"")
    rundir.prepare_resume(tmp_path, options("--seed", "3", "--resume"), identity(args))
    (entry,) = yaml.safe_load((tmp_path / rundir.RESUMES).read_text())
    assert (entry["from"], entry["changed"]) == ("last.prev.pt", {})
