"""--image-size HEIGHTxWIDTH: parsing (CLI, YAML, recipe), decoding with portrait photos turned,
the cache keyed by both sides, batches, augmentations that would swap the sides, and a tiny
model trained and predicted end to end at 32x48."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_cli
from PIL import Image

from leaf_xla import data as data_module
from leaf_xla.commands.options import parse_args
from leaf_xla.commands.recipe import _as_options
from leaf_xla.commands.train import build_parser
from leaf_xla.data import decode
from leaf_xla.errors import UserError
from leaf_xla.loader import BatchLoader, LeafImages, ResizeCache, eval_batches
from leaf_xla.settings import image_shape, parse_image_size
from leaf_xla.transforms import create_transform


@pytest.mark.parametrize(
    "given,value,shape",
    [
        ("512", 512, (512, 512)),
        (512, 512, (512, 512)),
        ("512x512", 512, (512, 512)),  # a square is a plain number: old caches and runs match
        ("512x768", "512x768", (512, 768)),
        (" 480X768 ", "480x768", (480, 768)),
        ([480, 768], "480x768", (480, 768)),
    ],
)
def test_image_size_values(given, value, shape) -> None:
    assert parse_image_size(given) == value
    assert image_shape(given) == shape


@pytest.mark.parametrize("bad", ["512x", "x512", "512x768x3", "abc", "4", "0x512", [512], True])
def test_bad_image_size_is_a_user_error(bad) -> None:
    with pytest.raises(UserError, match="expected SIZE or HEIGHTxWIDTH"):
        parse_image_size(bad)


def test_image_size_from_the_cli_yaml_and_recipe(tmp_path, pp2020) -> None:
    args = parse_args(build_parser(), ["--image-size", "480x768"])
    assert args.image_size == "480x768"
    for text in ("image_size: 480x768", "image_size: [480, 768]"):
        config = tmp_path / "c.yaml"
        config.write_text(f"model: test_resnet\n{text}\n")
        assert parse_args(build_parser(), ["--config", str(config)]).image_size == "480x768"
    config.write_text("image_size: 480x\n")
    with pytest.raises(UserError, match=r"c.yaml: key 'image_size': --image-size '480x'"):
        parse_args(build_parser(), ["--config", str(config)])
    assert _as_options({"image_size": [480, 768]}) == ["--image-size", "480x768"]
    result = run_cli(
        "leaf_xla",
        "train",
        *("--model", "test_resnet", "--data-dir", str(pp2020), "--image-size", "512x"),
    )
    assert_user_error(result, "--image-size '512x': expected SIZE or HEIGHTxWIDTH")


def _marked(path: Path, width: int, height: int, **save) -> None:
    """A grey photo with a red block in its top-left corner."""
    array = np.full((height, width, 3), 128, np.uint8)
    array[: height // 4, : width // 4] = (255, 0, 0)
    Image.fromarray(array).save(path, quality=95, **save)


def _red(image: np.ndarray) -> tuple[int, int]:
    """(row, column) of the red block's centre, as fractions of 4."""
    rows, cols = np.nonzero((image[..., 0] > 200) & (image[..., 1] < 80))
    return int(4 * rows.mean() / image.shape[0]), int(4 * cols.mean() / image.shape[1])


def test_landscape_sizes_keep_landscape_photos_and_turn_portrait_ones(tmp_path) -> None:
    landscape, portrait = tmp_path / "wide.jpg", tmp_path / "tall.jpg"
    _marked(landscape, 96, 64)
    _marked(portrait, 64, 96)
    wide = decode(landscape, "32x48")[0]
    assert wide.shape == (32, 48, 3) and _red(wide) == (0, 0)
    # Turned a quarter counter-clockwise: the top-left corner lands bottom-left.
    tall = decode(portrait, "32x48")[0]
    assert tall.shape == (32, 48, 3) and _red(tall) == (3, 0)
    # A portrait size turns landscape photos the same way; a square size squashes as before.
    assert decode(landscape, "48x32")[0].shape == (48, 32, 3)
    assert _red(decode(landscape, "48x32")[0]) == (3, 0)
    square = decode(portrait, 32)[0]
    assert square.shape == (32, 32, 3) and _red(square) == (0, 0)


def test_the_pil_path_turns_the_same_way(tmp_path, monkeypatch) -> None:
    portrait = tmp_path / "tall.jpg"
    _marked(portrait, 64, 96)
    fast = decode(portrait, "32x48")[0]
    monkeypatch.setattr(data_module, "_decode_turbo", lambda *a: "refused")  # to PIL
    assert np.abs(decode(portrait, "32x48")[0].astype(float) - fast).mean() < 1.5
    # Stored landscape with EXIF "turn 90 clockwise": a portrait photo, turned back.
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = tmp_path / "exif.jpg"
    _marked(turned, 96, 64, exif=exif.tobytes())
    image = decode(turned, "32x48")[0]
    assert image.shape == (32, 48, 3) and _red(image) == (0, 0)  # top-right, then turned back


def test_the_cache_is_keyed_by_both_sides(tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [folder / f"{k}.jpg" for k in range(3)]
    for path in paths:
        _marked(path, 96, 64)
    root = tmp_path / "cache"
    assert ResizeCache(root, 32).dir == ResizeCache(root, "32x32").dir == root / "32px"
    wide, tall = ResizeCache(root, "32x48"), ResizeCache(root, "48x32")
    assert wide.dir == root / "32x48px" and tall.dir == root / "48x32px"
    images = LeafImages(paths, None, "32x48", cache=wide, num_classes=2)
    batches = list(BatchLoader(images, eval_batches(3, 2, 1, 0)))
    assert [b["image"].shape for b in batches] == [(2, 3, 32, 48)] * 2
    assert batches[1]["mask"].tolist() == [1, 0] and not batches[1]["image"][1].any()
    assert all(np.load(wide.entry(p)).shape == (32, 48, 3) for p in paths)
    assert tall.stale(paths) == paths
    assert LeafImages(paths, None, "32x48", cache=tall).cache is None


def test_transforms_that_swap_the_sides_need_a_square_size() -> None:
    create_transform(augment=["Transpose"], square=True)
    with pytest.raises(UserError, match="Transpose swaps height and width"):
        create_transform(augment=["Transpose"], square=False)
    with pytest.raises(UserError, match="RandomRotate90"):
        create_transform(augment=[{"RandomRotate90": {"p": 0.5}}], square=False)
    nested = {"OneOf": {"transforms": ["Blur", {"SomeOf": {"transforms": ["D4"], "n": 1}}]}}
    create_transform(augment=[nested], square=True)
    with pytest.raises(UserError, match="D4 swaps height and width"):
        create_transform(augment=[nested], square=False)


def test_a_transform_that_changes_the_size_is_named(tmp_path) -> None:
    path = tmp_path / "a.jpg"
    _marked(path, 96, 64)
    images = LeafImages(
        [path], None, "32x48", lambda: create_transform(augment=["Transpose"]), num_classes=1
    )
    with pytest.raises(UserError, match="turned a 32x48 image into 48x32"):
        images.image(0, 1)  # Transpose with p 0.5: seed 1 draws it
    images.image(0, 0)


def test_train_and_predict_at_32x48(pp2020, tmp_path) -> None:
    """A tiny timm CNN, one epoch at 32x48 on the CPU, then flip TTA on the test set."""
    data = shutil.copytree(pp2020, tmp_path / "data", ignore=shutil.ignore_patterns(".leaf*"))
    out = tmp_path / "runs"
    result = run_cli(
        "leaf_xla",
        "train",
        *("--model", "test_efficientnet", "--config", "demo", "--data-dir", str(data)),
        *("--out-dir", str(out), "--epochs", "1", "--image-size", "32x48", "--device", "cpu"),
        *("--batch-size", "8", "--workers", "2"),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "32x48px" in result.stdout
    best = out / "test_efficientnet-fold0" / "best.pt"
    assert torch.load(best, weights_only=True)["image_size"] == "32x48"
    entries = list((data / ".leaf_xla_cache" / "32x48px").rglob("*.npy"))
    assert len(entries) >= 48 and np.load(entries[0]).shape == (32, 48, 3)

    csv = tmp_path / "test.csv"
    result = run_cli(
        "leaf_xla",
        "predict",
        *("--checkpoint", str(best), "--data-dir", str(data), "--out", str(csv)),
        *("--tta", "none", "hflip", "vflip", "--device", "cpu", "--batch-size", "8"),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    frame = pd.read_csv(csv)
    assert len(frame) == 21 and np.allclose(frame.iloc[:, 1:].sum(axis=1), 1, atol=1e-5)
