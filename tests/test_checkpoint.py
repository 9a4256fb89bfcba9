"""Checkpoint files: durable atomic writes, the previous last.pt kept, the mode `open()` gives,
and each way a file can be unusable told apart (and last.prev.pt as the resume's fallback)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import timm
import torch

from leaf_xla import checkpoint, files, rundir
from leaf_xla.backends.base import Runtime
from leaf_xla.checkpoint import CheckpointError

CPU = Runtime(kind="cpu", parallel="none", device=torch.device("cpu"))


def a_state(epoch: int, step: int = 0) -> dict:
    return {
        "model": {"w": torch.full((3,), float(epoch))},
        "config": {},
        "epoch": epoch,
        "step": step,
    }


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_rename_comes_after_the_file_is_fsynced_and_the_folder_after_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    )
    monkeypatch.setattr(
        os,
        "replace",
        lambda src, dst: (events.append(("rename", str(dst))), real_replace(src, dst)),
    )
    target = tmp_path / "out.csv"
    with files.atomic_path(target) as tmp:
        tmp.write_text("a,b\n")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert events == [("fsync", str(tmp)), ("rename", str(target)), ("fsync", str(tmp_path))]
    assert target.read_text() == "a,b\n" and not temps(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_mode_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        files.atomic_write_text(tmp_path / "submission.csv", "image_id\n")
        checkpoint.save(CPU, tmp_path / "best.pt", a_state(1))
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("submission.csv", "best.pt", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_a_full_disk_keeps_the_old_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(1))
    rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(2))
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")}

    def full_disk(state, path):
        Path(path).write_bytes(b"PK\x03\x04half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(3))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")} == before
    assert not temps(tmp_path)


def test_the_previous_last_checkpoint_is_kept(tmp_path):
    for epoch in (1, 2, 3):
        rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(epoch))
        checkpoint.save(CPU, tmp_path / "best.pt", a_state(epoch))
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 3
    assert checkpoint.load(tmp_path / "last.prev.pt")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]


class RunsCode:
    """A pickle that opens (creates) a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def broken_files(folder: Path) -> dict[str, Path]:
    good = folder / "good.pt"
    torch.save(a_state(1), good)
    data = good.read_bytes()
    made = {
        "is empty": b"",
        "is truncated": data[: len(data) // 2],
        "is not a PyTorch checkpoint": b"epoch,loss\n0,0.5\n",
    }
    directory = data.find(b"PK\x01\x02")  # the archive's central directory: its index
    made["is corrupt"] = data[: directory + 10] + bytes(20) + data[directory + 30 :]
    paths = {}
    for problem, content in made.items():
        paths[problem] = folder / f"{problem.replace(' ', '_')}.pt"
        paths[problem].write_bytes(content)
    paths["pickled Python objects"] = folder / "code.pt"
    torch.save({"model": RunsCode(folder / "ran"), "config": {}}, paths["pickled Python objects"])
    paths["not a leaf_xla checkpoint"] = folder / "list.pt"
    torch.save([torch.ones(2)], paths["not a leaf_xla checkpoint"])
    return paths


def test_each_unusable_checkpoint_says_what_is_wrong(tmp_path):
    for problem, path in broken_files(tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            checkpoint.load(path)
        message = str(caught.value)
        assert problem in message and str(path) in message, message
        assert "\n" not in message
    assert not (tmp_path / "ran").exists(), "unpickling ran code"


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(1, step=4))
    rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(2))
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # a host crash after the rename
    state, source = rundir.load_for_resume(tmp_path)
    assert (state["epoch"], state["step"], source.name) == (1, 4, "last.prev.pt")
    warning = capsys.readouterr().err
    assert f"{last} is truncated" in warning and "resuming from" in warning
    assert "epoch 1 step 4" in warning
    assert rundir.load_for_resume(tmp_path, warn=False)[1].name == "last.prev.pt"
    assert capsys.readouterr().err == ""  # the replicas, after the parent has warned


def test_resume_without_a_readable_checkpoint_tells_the_truth(tmp_path):
    rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(1))
    checkpoint.save(CPU, tmp_path / "best.pt", a_state(1))
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as alone:
        rundir.load_for_resume(tmp_path)
    rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(2))
    rundir.save_checkpoint(CPU, tmp_path, "last.pt", a_state(3))
    for name in ("last.pt", "last.prev.pt"):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(CheckpointError) as both:
        rundir.load_for_resume(tmp_path)
    for caught in (alone, both):
        message = str(caught.value)
        assert "best.pt holds no optimizer state" in message and "--overwrite" in message
        assert "use the other" not in message
    assert "no last.prev.pt" in str(alone.value)
    assert "last.prev.pt is not a PyTorch checkpoint" in str(both.value)


def test_a_checkpoint_with_another_class_count_is_a_one_line_error(tmp_path):
    saved = timm.create_model("test_resnet", num_classes=5)
    state = {"model": saved.state_dict(), "classes": list("abcde")}
    model = timm.create_model("test_resnet", num_classes=4)
    with pytest.raises(CheckpointError, match=r"5 classes \['a', 'b', 'c', 'd', 'e'\]"):
        checkpoint.load_model_state(model, state, tmp_path / "last.pt")
    checkpoint.load_model_state(saved, state, tmp_path / "last.pt")
