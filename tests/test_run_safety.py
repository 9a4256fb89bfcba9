"""`leaf-xla train` / `recipe` on run folders a user cares about: names that escape
--out-dir, a live run's lock, an --overwrite that fails or succeeds, and resumes with other
settings. The old runs are copies of test_train's reference run; new training runs use the
plain CPU device (quick), since what is tested here is the run folder, not the graphs.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import assert_user_error, run_cli
from test_train import reference_run, train_args

from leaf_xla import rundir

pytestmark = pytest.mark.slow

RUN = "test_resnet-fold0"


@pytest.fixture
def old_run(tmp_path_factory, tmp_path, pp2020) -> Path:
    """A copy of the reference run (3 epochs, finished): the hours a user must not lose."""
    reference = reference_run(tmp_path_factory, pp2020)
    shutil.copytree(reference.parent, tmp_path / "out")
    return tmp_path / "out" / RUN


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.is_dir())


@pytest.mark.parametrize("name", ["../victim", "/tmp/leaf_xla_victim", "a/b", ".."])
def test_run_names_outside_the_output_folder_are_refused(tmp_path, pp2020, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.pt").write_bytes(b"keep")
    result = run_cli(*train_args(pp2020, tmp_path / "out", "--run-name", name, "--overwrite"))
    assert_user_error(result, f"--run-name {name!r}", "plain folder name")
    assert (victim / "precious.pt").read_bytes() == b"keep"


def test_recipe_model_names_are_checked(tmp_path, pp2020):
    config = tmp_path / "escape.yaml"
    config.write_text("models:\n  - name: ../../elsewhere\n    config: demo\n")
    result = run_cli(
        "leaf_xla",
        "recipe",
        *("--config", str(config), "--data-dir", str(pp2020), "--out-dir", str(tmp_path)),
    )
    assert_user_error(result, f"{config}: models[0] name '../../elsewhere'", "plain folder")


def test_a_live_run_is_not_touched_by_a_second_process(old_run, pp2020):
    out = old_run.parent
    in_flight = old_run / ".last.pt.a1b2c3d4.tmp"  # the live run's save in progress
    in_flight.write_bytes(b"being written")
    before = snapshot(old_run)
    lock = old_run.with_name(f".{RUN}.lock")
    rundir.lock_run(old_run)
    try:
        for option in ("--resume", "--overwrite"):
            result = run_cli(*train_args(pp2020, out, option))
            assert_user_error(result, f"run folder {old_run} is in use by process {os.getpid()}")
    finally:
        rundir.release_lock(lock)
    assert snapshot(old_run) == before
    rundir.hold_lock(out / ".recipe.lock", "a recipe")
    try:
        second = run_cli(
            *("leaf_xla", "recipe", "--config", "demo_ensemble", "--data-dir", str(pp2020)),
            *("--out-dir", str(out)),
        )
        assert_user_error(second, f"output folder {out} (recipe) is in use by process")
    finally:
        rundir.release_lock(out / ".recipe.lock")


def test_an_overwrite_that_fails_before_best_pt_keeps_the_old_run(old_run, pp2020, tmp_path):
    before = snapshot(old_run)
    missing = tmp_path / "not_downloaded.safetensors"
    result = run_cli(*train_args(pp2020, old_run.parent, "--overwrite", "--weights", str(missing)))
    assert_user_error(result, f"--weights {missing}: file not found")
    assert "is back in place" in result.stderr
    assert snapshot(old_run) == before
    assert hidden(old_run.parent) == []


def test_a_resume_after_a_killed_overwrite_loses_neither_run(old_run, pp2020):
    """An --overwrite run killed after a mid-epoch last.pt and before its first best.pt: the
    old run is still aside, the new run's folder holds the newer state."""
    out = old_run.parent
    aside = out / f".{RUN}.overwritten"
    old_run.rename(aside)
    old_run.mkdir()
    shutil.copy(aside / "config.yaml", old_run / "config.yaml")
    state = torch.load(aside / "last.prev.pt", weights_only=True)  # at epoch 2 step 4
    state["best_score"] = -math.inf  # as a run before its first best.pt
    torch.save(state, old_run / "last.pt")
    old, new = snapshot(aside), snapshot(old_run)
    for flags in (["--resume"], []):
        refused = run_cli(*train_args(pp2020, out, *flags, "--device", "cpu"))
        assert_user_error(refused, "stopped before its first best.pt", "--resume --overwrite")
        assert snapshot(aside) == old and snapshot(old_run) == new
    resumed = run_cli(*train_args(pp2020, out, "--resume", "--overwrite", "--device", "cpu"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the run that --overwrite started" in resumed.stderr
    assert f"resuming {old_run} at epoch 2 step 4" in resumed.stdout
    assert torch.load(old_run / "last.pt", weights_only=True)["epoch"] == 3
    assert hidden(out) == []  # the old run went once the new one saved best.pt


def test_an_overwrite_replaces_the_old_run_once_it_has_trained(old_run, pp2020):
    out = old_run.parent
    result = run_cli(*train_args(pp2020, out, "--overwrite", "--epochs", "1", "--device", "cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(pd.read_csv(old_run / "history.csv")) == 1
    assert torch.load(old_run / "last.pt", weights_only=True)["epoch"] == 1
    assert hidden(out) == []
    umask = os.umask(0)
    os.umask(umask)
    for name in ("best.pt", "last.pt", "history.csv", "oof.csv", "config.yaml"):
        assert (old_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_the_old_run_is_deleted_as_soon_as_the_first_best_pt_is_saved(old_run, pp2020):
    """Killed after its first epoch (best.pt and last.pt saved), the new run has already
    freed the old run's space: train_worker called rundir.commit_overwrite."""
    args = train_args(pp2020, old_run.parent, "--overwrite", "--epochs", "3", "--device", "cpu")
    proc = subprocess.Popen([sys.executable, "-m", *args], stderr=subprocess.PIPE)
    last, deadline = old_run / "last.pt", time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            # The old last.pt says epoch 3: epoch 1 is the new run's, saved after its best.pt.
            if last.is_file() and torch.load(last, weights_only=True)["epoch"] == 1:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert hidden(old_run.parent) == []


def test_a_resume_with_other_settings_is_refused_with_a_diff(old_run, pp2020):
    out, before = old_run.parent, snapshot(old_run)
    changed = ("--seed", "4", "--image-size", "48", "--lr", "0.001")
    result = run_cli(*train_args(pp2020, out, "--resume", *changed))
    assert_user_error(
        result,
        f"--resume: {old_run / 'last.pt'} was trained with other settings",
        "seed: 3 -> 4",
        "image-size: 32 -> 48",
        "lr-max: 0.004 -> 0.001",
        "--force-resume",
    )
    classes = ("scab", "rust", "healthy", "multiple_diseases")
    reordered = run_cli(*train_args(pp2020, out, "--resume", "--classes", *classes))
    assert_user_error(reordered, "classes: ['healthy', 'multiple_diseases', 'rust', 'scab'] -> ")
    assert snapshot(old_run) == before

    forced = run_cli(*train_args(pp2020, out, "--resume", "--seed", "4", "--force-resume"))
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "warning: --force-resume" in forced.stderr and "seed: 3 -> 4" in forced.stderr
    (entry,) = yaml.safe_load((old_run / rundir.RESUMES).read_text())
    assert entry["forced"] is True and entry["changed"]["seed"] == {"was": 3, "now": 4}
    assert set(entry["changed"]) == {"seed", "out_dir"}  # the copy is another folder
    assert (entry["from"], entry["epoch"], entry["step"]) == ("last.pt", 3, 0)


def test_a_resume_refuses_other_folds_and_another_global_batch(old_run, pp2020):
    """Checkpoints hold rundir.resume_identity (fold digest, global batch) from train_worker."""
    folds_csv = old_run.parent / "folds.csv"
    original = folds_csv.read_bytes()
    folds_csv.unlink()  # recreated with another seed: other validation images
    folds = run_cli(*train_args(pp2020, old_run.parent, "--resume", "--fold-seed", "7"))
    assert_user_error(folds, "fold assignment")
    folds_csv.write_bytes(original)
    batch = run_cli(*train_args(pp2020, old_run.parent, "--resume", "--batch-size", "4"))
    assert_user_error(batch, "global-batch: 8 -> 4")


def test_a_resume_keeps_config_yaml_and_records_what_changed(old_run, pp2020):
    original = (old_run / "config.yaml").read_text()
    more = ("--epochs", "4", "--log-every", "2", "--device", "cpu")
    result = run_cli(*train_args(pp2020, old_run.parent, "--resume", *more))
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(old_run / "last.pt", weights_only=True)["epoch"] == 4
    (entry,) = yaml.safe_load((old_run / rundir.RESUMES).read_text())
    assert entry["changed"]["epochs"] == {"was": 3, "now": 4}
    assert entry["changed"]["log_every"] == {"was": 1, "now": 2}
    assert (old_run / "config.yaml").read_text() == original
