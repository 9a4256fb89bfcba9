"""Several real processes: `--parallel ddp` on the CPU (torch.distributed, gloo).

XLA:CPU cannot run multi-process collectives (pytorch/xla #9089), so this is where the
multi-replica logic (sharding, gathering, the broadcast of the initial weights, BatchNorm
averaging, one writer per host, failing together) runs for real. tests/hooks/sitecustomize.py
records what each replica loads and holds, and injects faults into one replica.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, assert_user_error, run_cli

pytestmark = pytest.mark.slow

HOOKS = str(REPO / "tests" / "hooks")
SEED = 3
# 64 images, 4 folds: 48 train and 16 validation images of 32 px.
COMMON = [
    *("--model", "test_resnet", "--config", "demo", "--image-size", "32", "--epochs", "2"),
    *("--workers", "1", "--cache", "off", "--device", "cpu", "--seed", str(SEED)),
    *("--sustain-epochs", "0", "--log-every", "1"),
]


def hooked(record: Path | None = None, fault: str | None = None) -> dict[str, str]:
    env = {"PYTHONPATH": os.pathsep.join([HOOKS, os.environ.get("PYTHONPATH", "")])}
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        env["LEAF_XLA_TEST_RECORD"] = str(record)
    if fault is not None:
        env["LEAF_XLA_TEST_FAULT"] = fault
    return env


def train(data: Path, out: Path, *extra: str, env: dict | None = None, timeout: int = 600):
    args = ["leaf_xla", "train", "--data-dir", str(data), "--out-dir", str(out), *COMMON, *extra]
    return run_cli(*args, env=env, timeout=timeout)


def ddp(nprocs: int, per_replica: int) -> list[str]:
    return [*("--parallel", "ddp", "--nprocs", str(nprocs)), "--batch-size", str(per_replica)]


def aug_epoch(pp2020: Path, train_names: list[str]) -> dict[tuple[str, int], int]:
    """(image, augmentation seed) -> the epoch that draws it, as loader.train_batches does."""
    of = {}
    for epoch in range(2):
        seeds = np.random.default_rng([SEED, epoch, 1]).integers(0, 2**31, size=len(train_names))
        of.update({(name, int(s)): epoch for name, s in zip(train_names, seeds)})
    return of


@pytest.mark.parametrize("nprocs", [2, 4])
def test_replicas_share_the_data_once_and_end_bitwise_equal(tmp_path, pp2020, nprocs):
    """Every training image once per epoch and every validation image once per evaluation,
    across replicas; weights and BatchNorm statistics bitwise equal on every replica, although
    each replica seeds its own generators differently (replica 0's weights are broadcast)."""
    record = tmp_path / "record"
    result = train(
        pp2020, tmp_path, *ddp(nprocs, 12 // nprocs), "--eval-batch-size", "3", env=hooked(record)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"4 steps of 12 per epoch ({12 // nprocs} per replica) on {nprocs} cpu" in result.stdout
    run_dir = tmp_path / "test_resnet-fold0"
    folds = pd.read_csv(tmp_path / "folds.csv")
    val_names = {f"{i}.jpg" for i in folds.loc[folds["fold"] == 0, "image_id"]}
    train_names = [f"{i}.jpg" for i in folds.loc[folds["fold"] != 0, "image_id"]]
    epoch_of = aug_epoch(pp2020, train_names)

    seen: Counter = Counter()
    for rank in range(nprocs):
        lines = (record / f"seen-rank{rank}.txt").read_text().split("\n")[:-1]
        seen.update(tuple(line.split(" ")) for line in lines)
    train_seen = Counter()
    for (name, aug), times in seen.items():
        if aug == "None":
            if name != "<pad>":
                assert name in val_names and times == 2, (name, times)  # two evaluations
        else:
            train_seen[(name, epoch_of[(name, int(aug))])] += times
    assert set(train_seen.values()) == {1}
    assert sorted(train_seen) == sorted((n, e) for n in train_names for e in range(2))
    assert {n for n, aug in seen if aug == "None" and n != "<pad>"} == val_names

    states = [torch.load(record / f"last.pt-rank{r}.pt") for r in range(nprocs)]
    assert any(k.endswith("running_var") for k in states[0])
    for state in states[1:]:
        for key, tensor in states[0].items():
            assert torch.equal(state[key], tensor), key
    saved = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in states[0].items())
    # The job's one writer on this host wrote everything once.
    assert (run_dir / "best.pt").is_file() and (run_dir / "oof.csv").is_file()
    assert len(pd.read_csv(run_dir / "history.csv")) == 2


def test_mixing_and_ema_keep_the_replicas_equal(tmp_path, pp2020):
    """Each replica mixes its own batch with its own draws; the weights stay equal after the
    reduced step, so do the moving averages (their BatchNorm statistics averaged as the
    model's), bitwise on every replica at every save."""
    record = tmp_path / "record"
    result = train(
        pp2020,
        tmp_path,
        *ddp(2, 4),
        *("--mixup", "0.4", "--cutmix", "1.0", "--ema-decay", "0.9", "--checkpoint-every", "3"),
        env=hooked(record),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixing mixup 0.4 + cutmix 1 (p 1, switch 0.5), EMA 0.9" in result.stdout
    emas = [torch.load(record / f"last.pt-ema-rank{r}.pt") for r in range(2)]
    assert any(k.endswith("running_var") for k in emas[0])
    for key, tensor in emas[0].items():
        assert torch.equal(emas[1][key], tensor), key
    run_dir = tmp_path / "test_resnet-fold0"
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert all(torch.equal(saved["ema"][k], v) for k, v in emas[0].items())
    assert any(not torch.equal(saved["ema"][k], saved["model"][k]) for k in emas[0])
    history = pd.read_csv(run_dir / "history.csv")
    assert np.isfinite(history[["ema_val_loss", "ema_val_auc"]].to_numpy()).all()
    assert (run_dir / "best_ema.pt").is_file() and (run_dir / "oof_ema.csv").is_file()


def test_two_replicas_train_like_one_process_with_the_same_global_batch(tmp_path, pp2020):
    """GroupNorm model, SGD, no dropout: replicas of 6 match one process of 12 up to float
    summation order (weights within 1e-4 of their largest value, as in
    test_spmd.py). (BatchNorm normalises by each replica's own batch, as Keras' TPUStrategy
    does, so a BatchNorm model matches a single process only in expectation.)"""
    same = [
        *("--model", "test_efficientnet_gn", "--optimizer", "sgd", "--drop-rate", "0"),
        *("--lr-start", "0.02", "--lr", "0.05", "--no-scale-lr", "--eval-batch-size", "5"),
    ]
    runs = {}
    for name, layout in [("ddp", ddp(2, 6)), ("one", ["--parallel", "none", "--batch-size", "12"])]:
        result = train(pp2020, tmp_path, *same, *layout, "--run-name", name)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tmp_path / name
    mine, theirs = (torch.load(runs[n] / "last.pt", weights_only=True)["model"] for n in runs)
    for key, tensor in theirs.items():
        scale = float(tensor.abs().max()) if tensor.is_floating_point() else 0
        assert float((mine[key] - tensor).abs().max()) <= 1e-4 * scale + 1e-7, key
    oof = {n: pd.read_csv(runs[n] / "oof.csv") for n in runs}
    assert list(oof["ddp"]["image_id"]) == list(oof["one"]["image_id"])
    np.testing.assert_allclose(
        oof["ddp"].iloc[:, 1:].to_numpy(), oof["one"].iloc[:, 1:].to_numpy(), atol=1e-5
    )
    history = {n: pd.read_csv(runs[n] / "history.csv") for n in runs}
    np.testing.assert_allclose(history["ddp"]["val_auc"], history["one"]["val_auc"], atol=1e-6)
    # The weights' tolerance (1e-4): the second epoch's loss of this diverging model amplifies
    # rounding, whose size depends on the CPU (1.6e-5 relative on one machine, under 1e-5 on
    # another, the same with and without this step's non-finite guard).
    np.testing.assert_allclose(history["ddp"]["val_loss"], history["one"]["val_loss"], rtol=1e-4)


def kill_job_mid_epoch(args: list[str], run_dir: Path) -> None:
    """Start a ddp job, SIGKILL all its processes once last.pt holds a mid-epoch state."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the replicas join the CLI's process group: killed together
    )
    last, seen, deadline = run_dir / "last.pt", None, time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            stamp = last.stat().st_mtime_ns if last.is_file() else None
            if stamp is not None and stamp != seen:
                seen = stamp
                state = torch.load(last, weights_only=True)
                if state["epoch"] >= 1 and state["step"] > 0:
                    break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert torch.load(last, weights_only=True)["step"] > 0, stderr.decode()[-3000:]


def test_sigkill_of_the_whole_job_then_resume_is_bitwise(tmp_path, pp2020):
    extra = [*ddp(2, 4), "--checkpoint-every", "2", "--drop-rate", "0.2", "--epochs", "3"]
    reference = train(pp2020, tmp_path / "ref", *extra)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "killed"
    args = ["leaf_xla", "train", "--data-dir", str(pp2020), "--out-dir", str(out), *COMMON, *extra]
    kill_job_mid_epoch(args, out / "test_resnet-fold0")
    resumed = train(pp2020, out, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout

    ref, mine = (
        torch.load(o / "test_resnet-fold0" / "last.pt", weights_only=True)
        for o in (tmp_path / "ref", out)
    )
    for key, tensor in ref["model"].items():
        assert torch.equal(mine["model"][key], tensor), key
    for key, value in ref["optimizer"]["state"].items():
        assert all(torch.equal(mine["optimizer"]["state"][key][k], v) for k, v in value.items())
    columns = ["epoch", "lr", "train_loss", "val_loss", "val_auc"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(mine["history"])[columns], pd.DataFrame(ref["history"])[columns]
    )
    assert (out / "test_resnet-fold0" / "oof.csv").read_bytes() == (
        tmp_path / "ref" / "test_resnet-fold0" / "oof.csv"
    ).read_bytes()


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, pp2020) -> tuple[Path, Path]:
    """A private copy of the data and a 2-replica run of one epoch, to resume with faults."""
    root = tmp_path_factory.mktemp("one_epoch")
    data = root / "data"
    shutil.copytree(pp2020, data)
    result = train(data, root / "out", *ddp(2, 4), "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return data, root / "out"


def survivors(tag: str, grace: float = 30.0) -> list[int]:
    """The job's processes (the CLI's and its replicas: the tag is in their environment) still
    alive `grace` seconds after the CLI returned (an exiting process may take a moment)."""
    marker = f"LEAF_XLA_TEST_JOB={tag}".encode()
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                    alive.append(int(entry.name))
            except OSError:  # ended meanwhile, or not ours to read
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def resume_with(one_epoch, tmp_path, *extra: str, env: dict | None = None, data=None):
    """Resume a copy of the one-epoch run with 2 replicas: (the CLI's result, the job's
    processes left alive after it returned, last.pt, last.pt's bytes before). The timeout is
    generous: a loaded machine is slow, and a job that hangs fails the test all the same."""
    source_data, source_out = one_epoch
    out = tmp_path / "out"
    shutil.copytree(source_out, out)
    last = out / "test_resnet-fold0" / "last.pt"
    before = last.read_bytes()
    env = {**(env or {}), "LEAF_XLA_TEST_JOB": str(tmp_path)}
    result = train(data or source_data, out, *ddp(2, 4), "--resume", *extra, env=env, timeout=600)
    return result, survivors(str(tmp_path)), last, before


def break_image(one_epoch, tmp_path, validation: bool = False) -> tuple[Path, Path]:
    """A private copy of the data with one image of fold 0's training (or validation) part
    broken: a broken Huffman table, so that the file's ends stay whole."""
    data = tmp_path / "data"
    shutil.copytree(one_epoch[0], data)
    folds = pd.read_csv(one_epoch[1] / "folds.csv")
    part = folds["fold"] == 0 if validation else folds["fold"] != 0
    victim = data / "images" / f"{folds.loc[part, 'image_id'].iloc[5]}.jpg"
    raw = bytearray(victim.read_bytes())
    table = raw.index(b"\xff\xc4")
    raw[table + 5 : table + 21] = b"\xff" * 16
    victim.write_bytes(bytes(raw))
    return data, victim


def test_a_decode_error_in_one_replicas_shard_stops_the_job(one_epoch, tmp_path):
    data, victim = break_image(one_epoch, tmp_path)
    temp = tmp_path / "temp"  # where the replicas' failure reports go
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    result, alive, last, before = resume_with(one_epoch, tmp_path, data=data, env=env)
    assert_user_error(result, victim.name)
    assert alive == [], "replicas outlived the job"
    assert last.read_bytes() == before and not list(last.parent.glob(".*.tmp"))
    assert not list(temp.glob("leaf_xla-replicas-*")), "the reports' folder was left behind"


def test_skip_bad_images_trains_on_and_names_the_image_once(one_epoch, tmp_path):
    data, victim = break_image(one_epoch, tmp_path)
    result, _, last, before = resume_with(
        one_epoch, tmp_path, "--skip-bad-images", "--max-bad-fraction", "0.05", data=data
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warning = f"warning: epoch 1: skipped 1 unreadable training images: {victim.name}"
    assert result.stdout.count(warning) == 1, result.stdout
    assert last.read_bytes() != before


def test_skip_bad_images_stops_above_the_fraction(one_epoch, tmp_path):
    data, victim = break_image(one_epoch, tmp_path)
    result, alive, last, before = resume_with(one_epoch, tmp_path, "--skip-bad-images", data=data)
    # One of the epoch's 48 images is 2%, above the default 1%.
    assert_user_error(result, "1 of 48 training images", victim.name, "--max-bad-fraction 0.01")
    assert alive == [], "replicas outlived the job"
    assert last.read_bytes() == before and not list(last.parent.glob(".*.tmp"))


def test_skip_bad_images_never_skips_a_validation_image(one_epoch, tmp_path):
    data, victim = break_image(one_epoch, tmp_path, validation=True)
    result, _, last, before = resume_with(one_epoch, tmp_path, "--skip-bad-images", data=data)
    assert_user_error(result, victim.name, "skips training images only")
    assert last.read_bytes() == before


def spoil_images(one_epoch, tmp_path, validation: bool = False) -> tuple[Path, list[Path]]:
    """A private copy of the data with three images of fold 0's training (or validation)
    part spoiled three ways: cut in half, deleted, and a broken Huffman table (whose file
    looks whole until it is decoded, as when the resize cache is built)."""
    data, broken = break_image(one_epoch, tmp_path, validation)
    folds = pd.read_csv(one_epoch[1] / "folds.csv")
    part = folds["fold"] == 0 if validation else folds["fold"] != 0
    cut, gone = (data / "images" / f"{folds.loc[part, 'image_id'].iloc[k]}.jpg" for k in (1, 2))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    gone.unlink()
    return data, [cut, gone, broken]


def test_skip_bad_images_covers_missing_cut_and_cache_built_images(one_epoch, tmp_path):
    data, victims = spoil_images(one_epoch, tmp_path)
    cache = ["--cache", "build", "--cache-dir", str(tmp_path / "cache")]
    result, _, last, before = resume_with(
        one_epoch, tmp_path, "--skip-bad-images", "--max-bad-fraction", "0.1", *cache, data=data
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("3 training image(s) cannot be read and are skipped") == 1, output
    assert all(v.name in output for v in victims)
    assert result.stdout.count("warning: epoch 1: skipped 3 unreadable training images") == 1
    assert last.read_bytes() != before


def test_skip_bad_images_checks_the_fraction_before_training(one_epoch, tmp_path):
    data, victims = spoil_images(one_epoch, tmp_path)
    result, _, last, before = resume_with(one_epoch, tmp_path, "--skip-bad-images", data=data)
    assert_user_error(result, "2 of 48 training images cannot be read", victims[0].name)
    assert last.read_bytes() == before


def test_skip_bad_images_refuses_a_missing_validation_image(one_epoch, tmp_path):
    data, victims = spoil_images(one_epoch, tmp_path, validation=True)
    result, _, last, before = resume_with(one_epoch, tmp_path, "--skip-bad-images", data=data)
    assert_user_error(result, "validation image of this fold", "skips training images only")
    assert last.read_bytes() == before


def test_a_failed_write_on_the_writer_stops_every_replica(one_epoch, tmp_path):
    result, alive, last, before = resume_with(
        one_epoch, tmp_path, "--epochs", "2", env=hooked(fault="0:enospc:1")
    )
    assert_user_error(result, "No space left on device", "last.pt")
    assert alive == [], "replicas outlived the job"
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp"))


def test_a_non_finite_step_on_one_replica_is_skipped_by_every_replica(one_epoch, tmp_path):
    record = tmp_path / "record"
    env = hooked(record, fault="1:nan:3")
    result, _, last, before = resume_with(one_epoch, tmp_path, "--epochs", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = "warning: epoch 1: skipped 1 step(s) with a non-finite loss or gradients"
    assert result.stdout.count(warning) == 1, result.stdout
    state = torch.load(last, weights_only=True)
    assert [row["nonfinite_steps"] for row in state["history"]][-1] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    mine, other = (torch.load(record / f"last.pt-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(mine[k], other[k]) for k in mine)  # both replicas skipped it


def test_a_non_finite_batchnorm_statistic_on_one_replica_is_skipped_by_every_replica(
    one_epoch, tmp_path
):
    """BatchNorm statistics differ per replica: one replica's non-finite statistic (its loss
    finite) must stop the step on every replica, or the weights part for good."""
    record = tmp_path / "record"
    env = hooked(record, fault="1:nanbuffer:3")
    result, _, last, _ = resume_with(one_epoch, tmp_path, "--epochs", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("skipped 1 step(s) with a non-finite loss or gradients") == 1
    state = torch.load(last, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    mine, other = (torch.load(record / f"last.pt-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(mine[k], other[k]) for k in mine), "the replicas' weights parted"


def test_non_finite_steps_in_a_row_on_one_replica_stop_every_replica(one_epoch, tmp_path):
    result, alive, last, before = resume_with(
        one_epoch, tmp_path, "--epochs", "2", env=hooked(fault="1:nan:3:3")
    )
    assert_user_error(result, "non-finite loss or gradients at epoch 1 steps 2 to 4", "3 in a row")
    assert alive == [], "replicas outlived the job"
    assert last.read_bytes() == before and not list(last.parent.glob(".*.tmp"))


def test_torchrun_starts_the_same_job(one_epoch, tmp_path):
    """Under torchrun every process runs the command: the host's local rank 0 prepares the
    run (folds, run folder) once, and training matches a job started with --nprocs (up to
    float rounding)."""
    data, reference = one_epoch
    out = tmp_path / "out"
    command = [
        *("torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("-m", "leaf_xla", "train", "--data-dir", str(data), "--out-dir", str(out), *COMMON),
        *("--parallel", "ddp", "--batch-size", "4", "--epochs", "1"),
    ]
    # torchrun sets OMP_NUM_THREADS=1 unless it is set: the reference's thread count, so that
    # torch's CPU reductions (and Adam, which amplifies their last bits) round alike.
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = run_cli(*command, timeout=300, env=threads)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("6 steps of 8 per epoch (4 per replica) on 2 cpu") == 1
    mine, theirs = (
        torch.load(o / "test_resnet-fold0" / "last.pt", weights_only=True)["model"]
        for o in (out, reference)
    )
    for key, tensor in theirs.items():
        scale = float(tensor.abs().max()) if tensor.is_floating_point() else 0
        assert float((mine[key] - tensor).abs().max()) <= 1e-4 * scale + 1e-6, key
