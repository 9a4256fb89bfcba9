"""`leaf-xla train` end to end on XLA:CPU: outputs, compile stability, spawn, bf16,
early stopping, non-finite losses and the persistent compilation cache.

Each training run compiles a tiny timm model (about half a minute on 2 cores), so one
reference run serves most checks; test_resume.py compares against it too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_cli

from leaf_xla.metrics import column_auc
from leaf_xla.schedule import Schedule

pytestmark = pytest.mark.slow

CLASSES = ["healthy", "multiple_diseases", "rust", "scab"]
STEPS = 6  # 48 training images (fold 0 of 4 holds out 16) in batches of 8
# Dropout and flips on: the resume test needs both to replay exactly. 16 validation images
# in batches of 12: the last is padded, as the compile-stability check needs.
REFERENCE = [
    *("--model", "test_resnet", "--config", "demo", "--image-size", "32", "--epochs", "3"),
    *("--batch-size", "8", "--eval-batch-size", "12", "--sustain-epochs", "0"),
    *("--drop-rate", "0.2", "--checkpoint-every", "2", "--log-every", "1"),
    *("--workers", "1", "--cache", "off", "--device", "xla", "--parallel", "none", "--seed", "3"),
]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["leaf_xla", "train", "--data-dir", str(data), "--out-dir", str(out), *REFERENCE, *extra]


def reference_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """The uninterrupted reference run, trained once per session (test_resume uses it)."""
    out = tmp_path_factory.getbasetemp() / "reference"
    run_dir = out / "test_resnet-fold0"
    if not (run_dir / "stdout.txt").is_file():
        shutil.rmtree(out, ignore_errors=True)
        result = run_cli(*train_args(data, out))
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pp2020) -> Path:
    return reference_run(tmp_path_factory, pp2020)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    # Read without TensorFlow (slow to import where installed), as train.py writes them.
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_no_compilation_after_the_first_epoch(reference):
    history = pd.read_csv(reference / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    # train.py reads torch_xla's CompileTime counter in the process that compiles.
    assert history["compiles"][0] > 0, "the count is not measured"
    assert list(history["compiles"][1:]) == [0, 0]
    # Said while the first step compiles, not in later epochs.
    said = (reference / "stdout.txt").read_text().count("compiling the training step")
    assert said == 1
    # ... although the lr changed at every step of every epoch (ramp, then decay).
    lrs = [lr for _, lr in tensorboard_scalars(reference)["train/lr"]]
    assert len(set(lrs)) == len(lrs) == 3 * STEPS


def test_lr_follows_the_schedule_per_update(reference):
    schedule = Schedule(1e-3, 4e-3, 3e-4, ramp_epochs=1, sustain_epochs=0, decay=0.6)  # demo
    logged = tensorboard_scalars(reference)["train/lr"]
    assert [step for step, _ in logged] == list(range(3 * STEPS))
    for step, lr in logged:
        assert lr == pytest.approx(schedule(step / STEPS), rel=1e-6)
    history = pd.read_csv(reference / "history.csv")
    assert list(history["lr"]) == pytest.approx([schedule(e) for e in range(3)])


def test_history_best_checkpoint_and_oof(reference, pp2020):
    history = pd.read_csv(reference / "history.csv")
    for column in ["train_loss", "val_loss", "val_auc", *(f"auc_{c}" for c in CLASSES)]:
        assert np.isfinite(history[column]).all(), column
    per_class = history[[f"auc_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(history["val_auc"], per_class.mean(1))

    best_epoch = int(history["val_auc"].idxmax())
    best = torch.load(reference / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch + 1 and best["step"] == 0
    assert best["best_score"] == pytest.approx(history["val_auc"].max())
    assert best["metric"] == "auc"  # Plant Pathology 2020's
    assert "optimizer" not in best and best["classes"] == CLASSES
    last = torch.load(reference / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (3, 0)

    # oof.csv: the best epoch's predictions, one row per validation image, scoring its AUC.
    oof = pd.read_csv(reference / "oof.csv")
    folds = pd.read_csv(reference.parent / "folds.csv")
    train = pd.read_csv(pp2020 / "train.csv")
    val_ids = train["image_id"][folds["fold"].to_numpy() == 0]
    assert list(oof["image_id"]) == list(val_ids)
    targets = train.set_index("image_id").loc[oof["image_id"], CLASSES].to_numpy()
    aucs = column_auc(targets, oof[CLASSES].to_numpy())
    assert np.nanmean(aucs) == pytest.approx(history["val_auc"][best_epoch], abs=1e-4)


def test_logs_tensorboard_and_plots(reference):
    scalars = tensorboard_scalars(reference)
    assert {"train/loss", "train/lr", "epoch/val_auc", "epoch/train_loss"} <= set(scalars)
    assert len(scalars["epoch/val_auc"]) == 3
    for name in ["loss", "auc", "lr", "roc", "confusion"]:
        assert (reference / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    stdout = (reference / "stdout.txt").read_text()
    epochs = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 and epochs[-1].endswith(" 0 compile(s)")


def test_spawn_bf16_and_early_stopping(tmp_path, pp2020):
    """One spawned process (multi-process collectives hang on XLA:CPU: pytorch/xla #9089),
    bf16 autocast, and --patience: a GroupNorm model (no BatchNorm statistics to drift) at a
    learning rate too small to move fp32 weights scores the same AUC every epoch, and so does
    its moving average (mixup, CutMix and EMA on: they compile once too)."""
    result = run_cli(
        *train_args(pp2020, tmp_path, "--parallel", "spawn", "--precision", "bf16"),
        *("--model", "test_efficientnet_gn", "--epochs", "4", "--patience", "1"),
        *("--lr-start", "1e-20", "--lr", "1e-20", "--lr-min", "1e-20", "--drop-rate", "0"),
        *("--mixup", "0.4", "--cutmix", "1.0", "--ema-decay", "0.9"),
        env={"LEAF_XLA_SINGLE_PROCESS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 1 xla replica(s) (spawn); peak lr" in result.stdout
    assert "32px, bf16" in result.stdout
    assert "early stop: no better validation AUC for 1 epochs" in result.stdout
    run_dir = tmp_path / "test_efficientnet_gn-fold0"
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 2 and history["val_auc"][0] == history["val_auc"][1]
    assert history["ema_val_auc"][0] == history["ema_val_auc"][1] == history["val_auc"][0]
    assert history["compiles"][1] == 0
    assert (run_dir / "best_ema.pt").is_file() and (run_dir / "oof_ema.csv").is_file()
    assert np.isfinite(history[["train_loss", "val_loss"]]).all().all()
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in last["model"].values() if v.is_floating_point())
    assert (
        last["epoch"] == 2 and (run_dir / "best.pt").is_file() and (run_dir / "oof.csv").is_file()
    )


def test_non_finite_steps_stop_and_keep_checkpoints(tmp_path, reference, pp2020):
    """Resume a copy of the finished reference run for one more epoch at lr 1e38: Adam's first
    update at that lr overflows some weights, so the step is undone, and so is every later
    one; two in a row stop the run before the checkpoint after step 2."""
    out = tmp_path / "out"
    shutil.copytree(reference.parent, out)
    run_dir = out / reference.name
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt", "oof.csv")}
    result = run_cli(
        *train_args(pp2020, out, "--resume", "--epochs", "4", "--force-resume"),
        *("--lr-start", "1e38", "--lr", "1e38", "--lr-min", "1e38", "--max-nonfinite-steps", "2"),
    )
    assert_user_error(
        result, "non-finite loss or gradients at epoch 3 steps 0 to 1 (2 in a row", "last.pt"
    )
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, f"{name} changed"


COMPILE_CACHE_SCRIPT = """
import sys
from pathlib import Path
import torch, torch_xla.debug.metrics as met
from leaf_xla import backends
rt = backends.setup("xla", sys.argv[1], compile_cache=Path(sys.argv[2]))
x = torch.arange(64.0).view(8, 8).to(rt.device)
y = (x @ x.T).relu().sum()
rt.sync()
assert float(y.cpu()) > 0
print({k: met.counter_value(k) for k in met.counter_names() if k.startswith("PersistentCache")})
"""


@pytest.mark.parametrize("parallel", ["none", "spmd"])
def test_persistent_compile_cache(tmp_path, parallel):
    """The cache is written, and the second run looks its graph up there. XLA:CPU cannot load
    what it wrote ("Deserializing serialized executable not supported"), so here the lookup
    finds the entry and compiles again; on TPU the same lookup is a hit."""
    cache = tmp_path / "cache"
    env = {**os.environ, "CPU_NUM_DEVICES": "4"}
    found = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", COMPILE_CACHE_SCRIPT, parallel, str(cache)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]  # SPMD used to segfault here
        found.append(eval(result.stdout.strip().splitlines()[-1]))
        assert any(cache.iterdir())
    assert found[0] == {"PersistentCacheMiss": 1}
    assert set(found[1]) & {"PersistentCacheHit", "PersistentCacheDeserializeFailure"}
