"""What a new user meets on a first run (issue 22): settings that cannot learn are named at
start, the ragged tail is counted, a checkpoint of another data set is called that, a missing
test image does not stop training, and Ctrl-C says how to go on.

Training here runs on the plain CPU device (no compile): a few seconds per tiny run.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_user_error, run_cli

TINY = [
    *("--model", "test_resnet", "--config", "demo", "--image-size", "32", "--device", "cpu"),
    *("--workers", "1", "--cache", "off"),
]
AUTO = [a for a in TINY if a not in ("--device", "cpu")]  # --device auto


@pytest.fixture(scope="module")
def pp2021_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One epoch on a small PP2021 layout with settings that deserve a warning each."""
    root = tmp_path_factory.mktemp("pp2021")
    data = root / "data"
    made = run_cli(
        *("leaf_xla", "synth", "--out", str(data), "--format", "pp2021", "--n-train", "32"),
        *("--n-test", "6", "--size", "48x40"),
    )
    assert made.returncode == 0, made.stderr
    result = run_cli(
        *("leaf_xla", "train", "--data-dir", str(data), "--out-dir", str(root / "runs"), *AUTO),
        # demo: 4 folds, so 24 training images; batches of 10 leave 4 out
        *("--epochs", "1", "--ramp-epochs", "1", "--batch-size", "10", "--no-pretrained"),
        *("--lr", "5e-5", "--lr-start", "1e-5", "--augment-preset", "strong"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "test_resnet-fold0" / "best.pt", result


def test_auto_without_an_accelerator_is_plain_cpu(pp2021_run):
    """conftest sets PJRT_DEVICE=CPU: XLA on the CPU is there, but only --device xla uses it."""
    _, result = pp2021_run
    assert "on 1 cpu replica(s)" in result.stdout, result.stdout
    assert "compiling" not in result.stdout


def test_settings_that_cannot_learn_are_named_at_start(pp2021_run):
    _, result = pp2021_run
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any(
        "--epochs 1 <= --ramp-epochs 1" in w and "lower --ramp-epochs or raise --epochs" in w
        for w in warnings
    ), result.stderr
    assert any(
        "--no-pretrained" in w and "--lr 5e-05 is a fine-tuning rate" in w for w in warnings
    ), result.stderr
    assert any(
        "--augment-preset strong was designed for about 480 px" in w and "at 32 px" in w
        for w in warnings
    ), result.stderr
    # Said before training: ahead of the first epoch's line.
    assert "epoch 0:" in result.stdout


def test_the_ragged_tail_is_counted_at_start(pp2021_run):
    _, result = pp2021_run
    assert "each epoch leaves out 4 of the 24 training images" in result.stdout, result.stdout
    assert "--batch-size" in result.stdout


def test_a_checkpoint_of_another_data_set_is_named_as_such(pp2021_run, pp2020, tmp_path):
    best, _ = pp2021_run
    result = run_cli(
        *("leaf_xla", "predict", "--checkpoint", str(best), "--data-dir", str(pp2020)),
        *("--out", str(tmp_path / "p.csv"), "--device", "cpu"),
    )
    assert_user_error(
        result,
        f"{best} was trained on multilabel data with classes",
        f"but {pp2020} is onehot data with classes healthy, multiple_diseases, rust, scab",
    )
    assert not (tmp_path / "p.csv").exists()


def test_train_with_a_recipe_config_says_to_use_recipe(pp2020, tmp_path):
    result = run_cli(
        *("leaf_xla", "train", "--config", "demo_ensemble", "--data-dir", str(pp2020)),
        *("--out-dir", str(tmp_path)),
    )
    assert_user_error(result, "demo_ensemble.yaml is an ensemble config", "leaf_xla", "recipe")
    result = run_cli(
        *("leaf_xla", "recipe", "--config", "demo", "--data-dir", str(pp2020)),
        *("--out-dir", str(tmp_path)),
    )
    assert_user_error(result, "demo.yaml is a training config", "leaf-xla train --config")


def _interrupt_after_first_checkpoint(argv: list[str], run_dir: Path) -> str:
    """Start training, Ctrl-C it once last.pt exists; its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            if (run_dir / "last.pt").is_file():
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    return stderr


def test_missing_test_image_warns_and_ctrl_c_prints_the_resume_command(pp2020, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(pp2020, data)
    test_id = pd.read_csv(data / "test.csv")["image_id"].iloc[3]
    (data / "images" / f"{test_id}.jpg").unlink()

    # Many epochs: the run is still going when the signal comes.
    argv = ["leaf_xla", "train", "--data-dir", str(data), "--out-dir", str(out), *TINY]
    argv += ["--epochs", "200", "--batch-size", "8", "--skip-bad-images"]
    stderr = _interrupt_after_first_checkpoint(argv, out / "test_resnet-fold0")
    assert f"warning: {data / 'images' / test_id}.jpg: missing image file" in stderr, stderr
    assert "training goes on without it, but predict will refuse" in stderr
    last = out / "test_resnet-fold0" / "last.pt"
    assert f"interrupted: {last} holds the run's last saved state; continue it with:" in stderr
    command = shlex.split(stderr.split("continue it with:\n", 1)[1].splitlines()[0])
    assert command[:4] == ["python", "-m", "leaf_xla", "train"]
    assert command[4:] == [*argv[2:], "--resume"]
    resumed = run_cli(*command[2:], "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout or "nothing to resume" in resumed.stdout

    # What does need the test images keeps refusing.
    for check in (
        run_cli("leaf_xla", "check", "--data-dir", str(data), "--no-decode"),
        run_cli(
            *("leaf_xla", "recipe", "--config", "demo_ensemble", "--data-dir", str(data)),
            *("--out-dir", str(tmp_path / "recipe"), "--device", "cpu"),
        ),
    ):
        assert check.returncode != 0 and f"{test_id}.jpg: missing image file" in (
            check.stdout + check.stderr
        )
