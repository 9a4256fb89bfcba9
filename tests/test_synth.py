"""The synthetic data generator: layout, determinism, class signal."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leaf_xla.errors import SettingError
from leaf_xla.synth import PP2020_CLASSES, write_dataset


def digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_pp2020_layout(pp2020) -> None:
    train = pd.read_csv(pp2020 / "train.csv")
    test = pd.read_csv(pp2020 / "test.csv")
    sample = pd.read_csv(pp2020 / "sample_submission.csv")
    assert list(train.columns) == ["image_id", *PP2020_CLASSES]
    assert (train[list(PP2020_CLASSES)].sum(axis=1) == 1).all()
    assert train["image_id"].tolist() == [f"Train_{i}" for i in range(64)]
    assert test["image_id"].tolist() == sample["image_id"].tolist()
    assert list(sample.columns) == ["image_id", *PP2020_CLASSES]
    assert (train[list(PP2020_CLASSES)].sum() >= 2).all()  # every class, for folds and AUC
    with Image.open(pp2020 / "images" / "Test_20.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (96, 64))


def test_deterministic_per_seed(tmp_path) -> None:
    a = write_dataset(tmp_path / "a", 12, 3, seed=5, size=(48, 32))
    b = write_dataset(tmp_path / "b", 12, 3, seed=5, size=(48, 32))
    c = write_dataset(tmp_path / "c", 12, 3, seed=6, size=(48, 32))
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_classes_carry_visual_signal(tmp_path) -> None:
    """Rust leaves are more orange than healthy ones: a signal a CNN can learn."""
    data = write_dataset(tmp_path / "d", 80, 1, seed=0, size=(96, 64))
    train = pd.read_csv(data / "train.csv")

    def orange_fraction(image_id: str) -> float:
        rgb = np.asarray(Image.open(data / "images" / f"{image_id}.jpg")).astype(int)
        return float(((rgb[..., 0] > 180) & (rgb[..., 1] > 90) & (rgb[..., 2] < 80)).mean())

    rust = [orange_fraction(i) for i in train.loc[train.rust == 1, "image_id"]]
    healthy = [orange_fraction(i) for i in train.loc[train.healthy == 1, "image_id"]]
    assert min(rust) > max(healthy)


def orange(path) -> float:
    rgb = np.asarray(Image.open(path)).astype(int)
    return float(((rgb[..., 0] > 180) & (rgb[..., 1] > 90) & (rgb[..., 2] < 80)).mean())


def test_label_noise_flips_train_labels_only_and_test_labels_are_true(tmp_path) -> None:
    classes = list(PP2020_CLASSES)
    clean = write_dataset(tmp_path / "clean", 80, 40, seed=2, size=(96, 64))
    hidden = tmp_path / "hidden" / "test_labels.csv"
    noisy = write_dataset(
        tmp_path / "noisy", 80, 40, seed=2, size=(96, 64), label_noise=0.25, test_labels=hidden
    )
    # The same images; a quarter of the train labels replaced by another class.
    assert digest(clean / "images") == digest(noisy / "images")
    before = pd.read_csv(clean / "train.csv")[classes].to_numpy()
    after = pd.read_csv(noisy / "train.csv")[classes].to_numpy()
    assert (after.sum(1) == 1).all()
    assert (before != after).any(1).sum() == 20
    # The hidden labels are the test images' true classes: rust images are the orange ones.
    labels = pd.read_csv(hidden)
    assert labels["image_id"].tolist() == pd.read_csv(noisy / "test.csv")["image_id"].tolist()
    assert (labels[classes].sum(axis=1) == 1).all() and not list(noisy.rglob("test_labels*"))
    score = labels["image_id"].map(lambda i: orange(noisy / "images" / f"{i}.jpg"))
    assert score[labels.rust == 1].min() > score[labels.healthy == 1].max()


def test_weaker_signal_fades_the_spots_and_labels_stay_outside(tmp_path) -> None:
    strong = write_dataset(tmp_path / "s", 12, 2, seed=3, size=(96, 64))
    faint = write_dataset(tmp_path / "f", 12, 2, seed=3, size=(96, 64), signal=0.4)
    rust = pd.read_csv(strong / "train.csv").query("rust == 1")["image_id"]
    for image_id in rust:
        assert orange(faint / "images" / f"{image_id}.jpg") < orange(
            strong / "images" / f"{image_id}.jpg"
        )
    with pytest.raises(SettingError, match="inside"):
        write_dataset(tmp_path / "x", 12, 2, test_labels=tmp_path / "x" / "labels.csv")
    with pytest.raises(SettingError, match="signal"):
        write_dataset(tmp_path / "y", 12, 2, signal=0)
