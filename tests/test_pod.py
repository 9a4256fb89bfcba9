"""A simulated pod slice: 2 "hosts" x 2 replicas on this machine, each host with its own disk.

Each host runs the same command in its own folder (its working directory: `data/`, `runs/`),
as the hosts of a TPU pod run one command on their own local disks; nothing is shared but the
job's TCP rendezvous. The whole recipe must end with a submission on every host, a resume must
find the hosts in agreement, and a failure on host 1 alone must stop host 0 too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error
from test_ddp import hooked

pytestmark = pytest.mark.slow

RECIPE = """\
folds: [0]
tta: [none, hflip]
models:
  - name: tiny
    config: demo
    args: {model: test_resnet}
"""
TRAIN = [
    *("--epochs", "2", "--image-size", "32", "--batch-size", "4", "--eval-batch-size", "6"),
    *("--workers", "1", "--cache", "off", "--seed", "5"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_hosts(hosts: list[Path], command: list[str], env: dict | None = None) -> list:
    """Run `command` on every host at once (host k: --node-rank k); their results, in order."""
    port = str(free_port())
    procs = []
    for rank, host in enumerate(hosts):
        layout = [*("--device", "cpu", "--parallel", "ddp", "--nprocs", "2", "--nnodes", "2")]
        layout += ["--node-rank", str(rank), "--master-port", port]
        full = [sys.executable, "-m", *command[:2], *layout, *command[2:]]
        procs.append(
            subprocess.Popen(
                full,
                cwd=host,
                env={**os.environ, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="module")
def pod(tmp_path_factory, pp2020) -> list[Path]:
    """Two hosts, each with its own copy of the data, that have run the whole recipe."""
    root = tmp_path_factory.mktemp("pod")
    (root / "recipe.yaml").write_text(RECIPE)
    hosts = [root / f"host{k}" for k in range(2)]
    for host in hosts:
        shutil.copytree(pp2020, host / "data")
    recipe = ["leaf_xla", "recipe", "--config", str(root / "recipe.yaml")]
    recipe += ["--data-dir", "data", "--out-dir", "runs", "--", *TRAIN]
    results = on_hosts(hosts, recipe, env=hooked(record=root / "record"))
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    assert "ensemble" in results[0].stdout
    return hosts


def test_the_recipe_ends_with_the_same_submission_on_every_host(pod):
    host0, host1 = pod
    for name in ("submission.csv", "predictions/tiny.csv", "tiny-fold0/oof.csv"):
        assert (host0 / "runs" / name).read_bytes() == (host1 / "runs" / name).read_bytes(), name
    for name in ("best.pt", "last.pt"):
        states = [torch.load(h / "runs/tiny-fold0" / name, weights_only=True) for h in pod]
        for key, tensor in states[0]["model"].items():
            assert torch.equal(states[1]["model"][key], tensor), (name, key)
    record = pod[0].parent / "record"
    replicas = [torch.load(record / f"last.pt-rank{r}.pt") for r in range(4)]
    for state in replicas[1:]:
        assert all(torch.equal(state[k], v) for k, v in replicas[0].items())


def test_hosts_that_disagree_on_the_run_to_resume_stop_with_one_error_each(pod, tmp_path):
    hosts = []
    for k, host in enumerate(pod):
        hosts.append(tmp_path / f"host{k}")
        shutil.copytree(host, hosts[-1])
    shutil.rmtree(hosts[1] / "runs" / "tiny-fold0")  # host 1 lost its copy of the run
    recipe = ["leaf_xla", "recipe", "--config", str(pod[0].parent / "recipe.yaml")]
    recipe += ["--data-dir", "data", "--out-dir", "runs", "--resume", "--", *TRAIN]
    for result in on_hosts(hosts, recipe):
        assert_user_error(result, "replicas start from different states")
    # host 0's finished run is untouched
    last = torch.load(hosts[0] / "runs/tiny-fold0/last.pt", weights_only=True)
    assert last["epoch"] == 2


def test_a_failed_write_on_host_1_stops_host_0_too(pod, tmp_path):
    hosts = []
    for k, host in enumerate(pod):
        hosts.append(tmp_path / f"host{k}")
        shutil.copytree(host / "data", hosts[-1] / "data")
    train = [
        "leaf_xla",
        "train",
        "--data-dir",
        "data",
        "--out-dir",
        "runs",
        "--model",
        "test_resnet",
    ]
    train += ["--config", "demo", *TRAIN]
    # Replica 2 is host 1's writer: its second last.pt (epoch 1's) fails.
    results = on_hosts(hosts, train, env=hooked(fault="2:enospc:2"))
    assert_user_error(results[1], "No space left on device")
    assert_user_error(results[0], "another machine failed first")
    for host in hosts:  # neither host replaced epoch 0's checkpoint: they still agree
        state = torch.load(host / "runs/test_resnet-fold0/last.pt", weights_only=True)
        assert (state["epoch"], state["step"]) == (1, 0)


def test_hosts_with_different_folds_stop_before_training(pod, tmp_path):
    """Each host reads the folds file from its own disk: hosts that split the data differently
    would train different models, or run different step counts and hang at an epoch's end."""
    import pandas as pd

    hosts = []
    for k, host in enumerate(pod):
        hosts.append(tmp_path / f"host{k}")
        shutil.copytree(host / "data", hosts[-1] / "data")
        (hosts[-1] / "runs").mkdir()
    folds = pd.read_csv(pod[0] / "runs" / "folds.csv")
    folds.to_csv(hosts[0] / "runs" / "folds.csv", index=False)
    folds["fold"] = folds["fold"].sample(frac=1.0, random_state=3).to_numpy()  # same sizes
    folds.to_csv(hosts[1] / "runs" / "folds.csv", index=False)
    train = [
        "leaf_xla",
        "train",
        "--data-dir",
        "data",
        "--out-dir",
        "runs",
        "--model",
        "test_resnet",
    ]
    train += ["--config", "demo", *TRAIN]
    for result in on_hosts(hosts, train):
        assert_user_error(result, "replicas start from different states", "folds")
    for host in hosts:
        assert not list((host / "runs").glob("*/*.pt")), "a host trained"
