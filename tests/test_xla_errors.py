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
