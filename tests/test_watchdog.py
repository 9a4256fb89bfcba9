"""The XLA watchdog: a replica whose steps stop finishing (a host of the pod failed, and this
one waits in a collective for ever) stops with one error line instead of hanging. SPMD over 4
virtual CPU devices stands in for several replicas (one replica alone has no peer to wait
for, and is not watched)."""

from __future__ import annotations

import pytest
from conftest import assert_user_error, run_cli
from test_ddp import hooked

pytestmark = pytest.mark.slow


def test_a_step_that_never_finishes_stops_the_run_with_one_line(pp2020, tmp_path):
    result = run_cli(
        *("leaf_xla", "train", "--data-dir", str(pp2020), "--out-dir", str(tmp_path / "runs")),
        *("--model", "test_resnet", "--config", "demo", "--image-size", "32", "--epochs", "1"),
        *("--workers", "1", "--cache", "off", "--device", "xla", "--parallel", "spmd"),
        *("--dist-timeout", "30", "--batch-size", "4"),  # 4 replicas: 3 steps of 16
        env={"CPU_NUM_DEVICES": "4", **hooked(fault="0:hang:3")},  # the third step hangs
        timeout=900,
    )
    assert_user_error(result, "no training step finished", "replica 0", "--dist-timeout")
    assert not list((tmp_path / "runs").glob("*/*.pt"))
