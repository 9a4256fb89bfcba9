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
from test_ddp import hooked
from test_train import reference_run, train_args

from leaf_xla import folds
from leaf_xla.data import read_dataset
from leaf_xla.loader import train_batches

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
    """train_worker loads with rundir.load_for_resume(run_dir, warn=False)."""
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
        *("leaf_xla", "predict", "--checkpoint", str(ref_dir / "best_ema.pt"), "--split", "train"),
        *("--data-dir", str(pp2020), "--out", str(predicted), "--device", "cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    oof_ema = pd.read_csv(ref_dir / "oof_ema.csv")
    again = pd.read_csv(predicted).set_index("image_id").loc[oof_ema["image_id"]]
    np.testing.assert_allclose(again.to_numpy(), oof_ema.iloc[:, 1:].to_numpy(), atol=1e-4)


# --- what an epoch counts survives its resume (eager CPU: quick, one replica) ---------------

# 48 training images in 6 steps of 8; last.pt after steps 2 and 4, and at the epoch's end.
COUNTED = [
    *("--model", "test_resnet", "--config", "demo", "--image-size", "32", "--epochs", "1"),
    *("--batch-size", "8", "--checkpoint-every", "2", "--sustain-epochs", "0", "--seed", "3"),
    *("--workers", "1", "--cache", "off", "--device", "cpu", "--parallel", "none"),
]


def counted_run(data: Path, out: Path, *extra: str, fault: str | None = None):
    env = hooked(fault=fault) if fault else None
    args = ["leaf_xla", "train", "--data-dir", str(data), "--out-dir", str(out), *COUNTED, *extra]
    return run_cli(*args, env=env)


def back_to_step_4(out: Path, tmp_path: Path) -> Path:
    """A copy of a finished one-epoch run whose last.pt is the save at step 4 (last.prev.pt):
    what a kill between that save and the epoch's end leaves."""
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.copy(copy / RUN / "last.prev.pt", copy / RUN / "last.pt")
    assert torch.load(copy / RUN / "last.pt", weights_only=True)["step"] == 4
    return copy


def test_a_resumed_epoch_counts_its_non_finite_steps_as_the_uninterrupted_one(tmp_path, pp2020):
    # Steps 1 to 3 get a NaN loss: 3 in a row, one fewer than stops the run.
    out = tmp_path / "out"
    result = counted_run(pp2020, out, "--max-nonfinite-steps", "4", fault="0:nan:2:3")
    assert result.returncode == 0, result.stderr[-3000:]
    whole = pd.read_csv(out / RUN / "history.csv")
    assert whole["nonfinite_steps"].tolist() == [3]
    resumed = back_to_step_4(out, tmp_path)
    result = counted_run(pp2020, resumed, "--max-nonfinite-steps", "4", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 3 step(s) with a non-finite loss" in result.stdout
    again = pd.read_csv(resumed / RUN / "history.csv")
    assert again["nonfinite_steps"].tolist() == [3]
    assert again["train_loss"].tolist() == pytest.approx(whole["train_loss"].tolist(), rel=1e-6)


def test_non_finite_steps_in_a_row_across_a_resume_stop_where_they_would_have(tmp_path, pp2020):
    # Steps 2 to 5 non-finite, 3 in a row stop: at step 4, after the save at step 4.
    out = tmp_path / "out"
    result = counted_run(pp2020, out, "--max-nonfinite-steps", "3", fault="0:nan:3:4")
    assert_user_error(result, "non-finite loss or gradients at epoch 0 steps 2 to 4")
    assert torch.load(out / RUN / "last.pt", weights_only=True)["step"] == 4
    # Resumed at step 4, steps 4 and 5 still non-finite: the streak goes on from 2.
    resumed = counted_run(pp2020, out, "--max-nonfinite-steps", "3", "--resume", fault="0:nan:1:2")
    assert_user_error(resumed, "non-finite loss or gradients at epoch 0 steps 2 to 4")


def test_a_resumed_epoch_allows_the_same_unreadable_images(tmp_path, pp2020):
    """--max-bad-fraction counts the whole epoch's skipped images (those before the resume
    too) against all the training images, before training and at every epoch's end."""
    data = tmp_path / "data"
    shutil.copytree(pp2020, data, ignore=shutil.ignore_patterns(".leaf_xla_cache"))
    out = tmp_path / "out"
    dataset = read_dataset(data)
    fold_of = folds.load_or_create(
        out / "folds.csv", dataset.train.ids, dataset.train.targets, 4, 42, None
    )
    train_paths = [dataset.train.paths[i] for i in np.flatnonzero(fold_of != 0)]
    steps = train_batches(len(train_paths), 8, 1, 0, seed=3, epoch=0)
    victims = [train_paths[steps[step][0][0]] for step in (1, 5)]  # one each side of step 4
    for victim in victims:  # a broken Huffman table: only the decoder tells
        raw = bytearray(victim.read_bytes())
        table = raw.index(b"\xff\xc4")
        raw[table + 5 : table + 21] = b"\xff" * 16
        victim.write_bytes(bytes(raw))
    bad = ("--skip-bad-images", "--max-bad-fraction", "0.05")  # 2 of 48 is 4%
    result = counted_run(data, out, *bad)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: epoch 0: skipped 2 unreadable training images" in result.stdout
    resumed = back_to_step_4(out, tmp_path)
    result = counted_run(data, resumed, *bad, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: epoch 0: skipped 2 unreadable training images" in result.stdout
    assert victims[1].name in result.stdout
    # Above the fraction, the count is of all the training images, as before training.
    again = back_to_step_4(out, tmp_path / "again")
    result = counted_run(data, again, "--skip-bad-images", "--max-bad-fraction", "0.03", "--resume")
    assert_user_error(result, "epoch 0: 2 of 48 training images cannot be decoded")
