"""SPMD data parallelism over 4 virtual XLA:CPU devices trains like one device given the same
global batch: the same per-step losses, validation scores and final weights, up to float
summation order (the partitioner splits each batch reduction into per-device partial sums).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli
from test_train import tensorboard_scalars, train_args

pytestmark = pytest.mark.slow

# SGD, fp32, no dropout, no flips: nothing random but the (seeded) batch order. Adam would
# amplify rounding differences: its first updates are about ±lr whatever the gradient's size.
SAME = [
    *("--optimizer", "sgd", "--lr-start", "0.02", "--lr", "0.05", "--drop-rate", "0"),
    *("--hflip", "0", "--vflip", "0", "--epochs", "2", "--checkpoint-every", "0"),
]


def test_spmd_matches_one_device_with_the_same_global_batch(tmp_path, pp2020):
    runs = {}
    for name, per_replica, eval_batch, env in [
        ("spmd", "4", "3", {"CPU_NUM_DEVICES": "4"}),
        ("none", "16", "12", {}),
    ]:
        args = train_args(pp2020, tmp_path, *SAME, "--run-name", name, "--parallel", name)
        result = run_cli(
            *args, "--batch-size", per_replica, "--eval-batch-size", eval_batch, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        replicas = 4 if name == "spmd" else 1
        assert f"3 steps of 16 per epoch ({per_replica} per replica) on {replicas} xla " in (
            result.stdout
        )
        assert f"replica(s) ({name})" in result.stdout
        runs[name] = tmp_path / name

    spmd, one = (pd.read_csv(runs[n] / "history.csv") for n in ("spmd", "none"))
    # Validation: 16 images in global batches of 12, padded to 24 and sharded 6 per device;
    # a sample lost or counted twice would move the mean loss far beyond this tolerance.
    np.testing.assert_allclose(spmd["val_loss"], one["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(spmd["val_auc"], one["val_auc"], atol=1e-3)
    # Reading sharded evaluation outputs used to compile a fresh graph every epoch.
    assert list(spmd["compiles"][1:]) == [0]

    losses = {n: tensorboard_scalars(runs[n])["train/loss"] for n in runs}
    assert [s for s, _ in losses["spmd"]] == [s for s, _ in losses["none"]] == list(range(6))
    np.testing.assert_allclose(
        [v for _, v in losses["spmd"]], [v for _, v in losses["none"]], rtol=1e-5
    )

    mine = torch.load(runs["spmd"] / "last.pt", weights_only=True)["model"]
    theirs = torch.load(runs["none"] / "last.pt", weights_only=True)["model"]
    for name, tensor in theirs.items():
        if tensor.is_floating_point():
            scale = float(tensor.abs().max())
            error = float((mine[name] - tensor).abs().max())
            assert error <= 1e-4 * scale + 1e-7, (name, error, scale)
        else:
            assert torch.equal(mine[name], tensor), name


def test_spmd_with_mixing_and_ema_compiles_once(tmp_path, pp2020):
    """Mixing pairs images within each device's shard and the average is updated in the
    sharded step: after the first epoch nothing compiles, and the average is saved. At a
    non-square size with the strong preset, so that those run sharded too."""
    args = train_args(pp2020, tmp_path, "--parallel", "spmd", "--batch-size", "4")
    result = run_cli(
        *args,
        *("--eval-batch-size", "3", "--epochs", "2", "--checkpoint-every", "0"),
        *("--mixup", "0.4", "--cutmix", "1.0", "--ema-decay", "0.9"),
        *("--image-size", "32x48", "--augment-preset", "strong"),
        env={"CPU_NUM_DEVICES": "4"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 4 xla replica(s) (spmd)" in result.stdout
    assert "32x48px" in result.stdout
    run_dir = tmp_path / "test_resnet-fold0"
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["compiles"][1:]) == [0]
    assert np.isfinite(history[["train_loss", "ema_val_loss", "ema_val_auc"]].to_numpy()).all()
    last = torch.load(run_dir / "last.pt", weights_only=True)
    moved = [k for k, v in last["ema"].items() if v.is_floating_point()]
    assert moved and all(torch.isfinite(last["ema"][k]).all() for k in moved)
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in moved)
    assert (run_dir / "best_ema.pt").is_file()


AGREE_SCRIPT = """
import torch
from leaf_xla import backends
rt = backends.setup("xla", "spmd")
same = torch.tensor([[7, -3, 2**30]] * 4, dtype=torch.int32)
low, high = rt.host_min_max(same)
assert torch.equal(low, high) and low.tolist() == [7, -3, 2**30], (low, high)
differ = same.clone()
differ[3, 1] = 5  # the rows of one device (on a pod: of one host) differ
low, high = rt.host_min_max(differ)
assert low.tolist() == [7, -3, 2**30] and high.tolist() == [7, 5, 2**30], (low, high)
rt.loaders = 2  # as on a pod of two hosts: the values of this one agree with themselves
rt.check_agree([1, 2, 3], "the run's state")
rt.barrier("test")
print("agreed")
"""


def test_spmd_hosts_compare_their_values_over_the_whole_mesh():
    """Under multi-host SPMD each host loads its run folder from its own disk: the hosts
    compare digests through one program over the mesh (each host's rows on its own devices).
    One host here: 4 virtual devices stand in for the hosts' devices."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", AGREE_SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "CPU_NUM_DEVICES": "4"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "agreed" in result.stdout
