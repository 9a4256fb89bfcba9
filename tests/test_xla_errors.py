"""Errors of the input pipeline reach the training loop on XLA (torch_xla's MpDeviceLoader
would end the epoch early without a word) and bad options fail before anything starts."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from conftest import assert_user_error, run_cli
from test_train import train_args


def test_a_bad_augment_entry_fails_before_training(tmp_path, pp2020):
    """It used to fail inside the loader thread, which torch_xla's device loader swallowed:
    0 steps trained, best.pt written, exit code 0."""
    result = run_cli(*train_args(pp2020, tmp_path, "--augment", "[GridWarp]"))
    assert_user_error(result, "augment: 'GridWarp' is not an albumentations transform")
    assert not list(tmp_path.glob("*/*.pt"))


@pytest.mark.slow
def test_an_undecodable_training_image_stops_an_xla_run_naming_it(tmp_path, pp2020):
    data = tmp_path / "data"
    shutil.copytree(pp2020, data)
    train = pd.read_csv(data / "train.csv")
    victim = data / "images" / f"{train['image_id'].iloc[1]}.jpg"
    raw = bytearray(victim.read_bytes())
    table = raw.index(b"\xff\xc4")  # a broken Huffman table; the file's ends stay whole
    raw[table + 5 : table + 21] = b"\xff" * 16
    victim.write_bytes(bytes(raw))
    result = run_cli(*train_args(data, tmp_path / "out", "--epochs", "1"))
    assert_user_error(result, victim.name, "cannot decode")
    assert not list((tmp_path / "out").glob("*/best.pt"))


@pytest.mark.slow
def test_skip_bad_images_masks_a_training_image_on_xla(tmp_path, pp2020):
    """The skipped image is counted inside the compiled step, so the count is the same on
    every backend; the run trains on and names it once per epoch."""
    data = tmp_path / "data"
    shutil.copytree(pp2020, data)
    ids = pd.read_csv(data / "train.csv")["image_id"].tolist()
    out = tmp_path / "out"
    out.mkdir()
    # Our own folds: the victim is a training image of fold 0.
    pd.DataFrame({"image_id": ids, "fold": [i % 4 for i in range(len(ids))]}).to_csv(
        out / "folds.csv", index=False
    )
    victim = data / "images" / f"{ids[1]}.jpg"
    raw = bytearray(victim.read_bytes())
    table = raw.index(b"\xff\xc4")
    raw[table + 5 : table + 21] = b"\xff" * 16
    victim.write_bytes(bytes(raw))
    extra = ("--epochs", "2", "--skip-bad-images", "--max-bad-fraction", "0.05")
    result = run_cli(*train_args(data, out, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (0, 1):
        warning = f"warning: epoch {epoch}: skipped 1 unreadable training images: {victim.name}"
        assert result.stdout.count(warning) == 1, result.stdout
    history = pd.read_csv(out / "test_resnet-fold0" / "history.csv")
    assert history["compiles"].iloc[1] == 0  # the skip changes data, never the graph
