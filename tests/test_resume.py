"""`--resume` after a SIGKILL mid-epoch ends with the weights of an uninterrupted run, bit for
bit; unreadable, mismatched or finished runs give one-line answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_cli
from test_train import reference_run, train_args

pytestmark = pytest.mark.slow

RUN = "test_resnet-fold0"


def kill_mid_epoch(args: list[str], run_dir: Path) -> dict:
    """Start training, SIGKILL it as soon as last.pt holds a mid-epoch state after epoch 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    last, seen, deadline = run_dir / "last.pt", None, time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            stamp = last.stat().st_mtime_ns if last.is_file() else None
            if stamp is not None and stamp != seen:
                seen = stamp  # last.pt is renamed into place whole: safe to read
                state = torch.load(last, weights_only=True)
                if state["epoch"] >= 1 and state["step"] > 0:
                    proc.kill()
                    break
            time.sleep(0.01)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode == -9, stderr.decode()[-3000:]
    # Later saves are two steps apart at least, so the kill lands mid-epoch.
    state = torch.load(last, weights_only=True)
    assert state["step"] > 0, "killed after the epoch ended"
    return state


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path_factory, tmp_path, pp2020):
    reference = reference_run(tmp_path_factory, pp2020)
    out = tmp_path / "out"
    run_dir = out / RUN
    killed = kill_mid_epoch(train_args(pp2020, out), run_dir)

    # Another batch size changes what a step is: refused, not silently misplaced.
    mismatch = run_cli(*train_args(pp2020, out, "--resume", "--batch-size", "4"))
    assert_user_error(mismatch, f"stopped at step {killed['step']} of 6 per epoch", "has 12")

    stale = run_dir / ".last.pt.k1ll3d.tmp"  # what a kill during torch.save leaves
    stale.write_bytes(b"half a checkpoint")
    result = run_cli(*train_args(pp2020, out, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not stale.exists()
    assert f"resuming {run_dir} at epoch {killed['epoch']} step {killed['step']}" in result.stdout

    # Bit for bit: the same batches, augmentations and dropout masks (seeded per step, not
    # carried across graph cuts) through the same compiled graphs on the same CPU.
    mine = torch.load(run_dir / "last.pt", weights_only=True)
    theirs = torch.load(reference / "last.pt", weights_only=True)
    assert (mine["epoch"], mine["step"]) == (theirs["epoch"], theirs["step"]) == (3, 0)
    for name, tensor in theirs["model"].items():
        assert torch.equal(mine["model"][name], tensor), name
    for index, state in theirs["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(mine["optimizer"]["state"][index][key], tensor), (index, key)
    # The history too, the interrupted epoch's train loss included (its sum so far is saved).
    timing = ["images_per_sec", "seconds", "compiles"]
    pd.testing.assert_frame_equal(
        pd.read_csv(run_dir / "history.csv").drop(columns=timing),
        pd.read_csv(reference / "history.csv").drop(columns=timing),
    )
    assert (run_dir / "oof.csv").read_bytes() == (reference / "oof.csv").read_bytes()

    # Resuming a finished run does nothing, and says so.
    before = (run_dir / "last.pt").read_bytes()
    again = run_cli(*train_args(pp2020, out, "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to resume" in again.stdout and "trained 3 epochs" in again.stdout
    assert (run_dir / "last.pt").read_bytes() == before


def test_an_unreadable_last_pt_falls_back_to_last_prev_pt(tmp_path_factory, tmp_path, pp2020):
    """train_worker loads with checkpoint.load_for_resume(run_dir, warn=False)."""
    reference = reference_run(tmp_path_factory, pp2020)
    out = tmp_path / "out"
    shutil.copytree(reference.parent, out)
    last, previous = out / RUN / "last.pt", out / RUN / "last.prev.pt"
    saved = torch.load(previous, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (2, 4)  # the save before the last one
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short by a crash
    # The rest of epoch 2 on the plain CPU device: quick, and what matters is where it starts.
    result = run_cli(*train_args(pp2020, out, "--resume", "--device", "cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f"warning: checkpoint {last} is truncated") == 1
    assert f"resuming from {previous} (epoch 2 step 4)" in result.stderr
    assert f"resuming {out / RUN} at epoch 2 step 4" in result.stdout
    state = torch.load(last, weights_only=True)
    assert (state["epoch"], state["step"]) == (3, 0)
    assert len(pd.read_csv(out / RUN / "history.csv")) == 3


def test_without_a_readable_last_checkpoint_resume_tells_the_truth(
    tmp_path_factory, tmp_path, pp2020
):
    reference = reference_run(tmp_path_factory, pp2020)
    out = tmp_path / "out"
    shutil.copytree(reference.parent, out)
    last, previous, best = (out / RUN / name for name in ("last.pt", "last.prev.pt", "best.pt"))
    best_bytes = best.read_bytes()
    last.write_bytes(b"")
    previous.write_bytes(b"junk")
    result = run_cli(*train_args(pp2020, out, "--resume"))
    assert_user_error(
        result,
        f"checkpoint {last} is empty",
        f"{previous} is not a PyTorch checkpoint",
        "best.pt holds no optimizer state",
        "--overwrite",
    )
    assert best.read_bytes() == best_bytes


# The strong preset, mixup and CutMix (not every batch), and the weights' moving average.
MIXED = [
    *("--augment-preset", "strong", "--mixup", "0.4", "--cutmix", "1.0", "--mix-prob", "0.8"),
    *("--ema-decay", "0.9"),
]


def test_resume_with_strong_augmentation_mixing_and_ema_is_bitwise(tmp_path, pp2020):
    reference = tmp_path / "reference"
    result = run_cli(*train_args(pp2020, reference, *MIXED))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "augment strong, mixing mixup 0.4 + cutmix 1 (p 0.8, switch 0.5), EMA 0.9" in (
        result.stdout
    )
    ref_dir = reference / RUN
    history = pd.read_csv(ref_dir / "history.csv")
    # Another lambda and box (or none) every step, and the average's evaluation: no new graph.
    assert history["compiles"][0] > 0 and list(history["compiles"][1:]) == [0, 0]
    assert np.isfinite(history[["ema_val_loss", "ema_val_auc"]].to_numpy()).all()

    out = tmp_path / "out"
    killed = kill_mid_epoch(train_args(pp2020, out, *MIXED), out / RUN)
    assert "ema" in killed
    other = run_cli(*train_args(pp2020, out, *MIXED, "--resume", "--ema-decay", "0.5"))
    assert_user_error(other, "ema-decay: 0.9 -> 0.5")
    resumed = run_cli(*train_args(pp2020, out, *MIXED, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    mine = torch.load(out / RUN / "last.pt", weights_only=True)
    theirs = torch.load(ref_dir / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, tensor in theirs[part].items():
            assert torch.equal(mine[part][name], tensor), (part, name)
    for index, state in theirs["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(mine["optimizer"]["state"][index][key], tensor), (index, key)
    timing = ["images_per_sec", "seconds", "compiles"]
    pd.testing.assert_frame_equal(
        pd.read_csv(out / RUN / "history.csv").drop(columns=timing), history.drop(columns=timing)
    )
    for name in ("oof.csv", "oof_ema.csv", "best.pt", "best_ema.pt"):
        assert (out / RUN / name).is_file(), name
    for name in ("oof.csv", "oof_ema.csv"):
        assert (out / RUN / name).read_bytes() == (ref_dir / name).read_bytes(), name

    # best_ema.pt: the average of the epoch whose average scored best, loadable as best.pt is.
    best_ema = torch.load(ref_dir / "best_ema.pt", weights_only=True)
    assert "optimizer" not in best_ema and "ema" not in best_ema
    assert best_ema["best_score"] == pytest.approx(history["ema_val_auc"].max())
    assert best_ema["epoch"] == int(history["ema_val_auc"].idxmax()) + 1
    predicted = tmp_path / "ema_oof.csv"
    result = run_cli(
        *("leaf_xla.predict", "--checkpoint", str(ref_dir / "best_ema.pt"), "--split", "train"),
        *("--data-dir", str(pp2020), "--out", str(predicted), "--device", "cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    oof_ema = pd.read_csv(ref_dir / "oof_ema.csv")
    again = pd.read_csv(predicted).set_index("image_id").loc[oof_ema["image_id"]]
    np.testing.assert_allclose(again.to_numpy(), oof_ema.iloc[:, 1:].to_numpy(), atol=1e-4)
