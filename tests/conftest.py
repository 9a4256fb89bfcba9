"""Shared test setup: XLA on the CPU, no network, small synthetic data sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before torch_xla is imported anywhere: XLA runs on the CPU, and nothing reaches a hub.
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pp2020(tmp_path_factory) -> Path:
    """A small Plant Pathology 2020 layout (read-only for tests: copy it to modify it)."""
    from leaf_xla.synth import write_dataset

    return write_dataset(
        tmp_path_factory.mktemp("pp2020"), n_train=64, n_test=21, seed=1, size=(96, 64)
    )


def run_cli(
    *args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m ARGS...` (`"leaf_xla", "train", ...`) as a user would; output captured."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit with one `error: ...` line naming the fragments, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
