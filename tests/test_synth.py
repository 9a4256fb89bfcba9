"""The synthetic data generator: layout, determinism, class signal."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from PIL import Image

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
