"""Label formats end to end, decoding (EXIF, colour modes, DCT-scaled JPEG decode accuracy)."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from PIL import Image

from leaf_xla import data as data_module
from leaf_xla import synth
from leaf_xla.commands import synth as synth_command
from leaf_xla.data import decode, read_dataset
from leaf_xla.errors import UserError
from leaf_xla.loader import ResizeCache, default_cache_root


def _synth(out, fmt: str, n_train: int = 16, n_test: int = 3) -> None:
    synth_command.main(
        ["--out", str(out), "--format", fmt, "--n-train", str(n_train), "--n-test", str(n_test)]
        + ["--size", "48x32", "--seed", "3"]
    )


def test_pp2020_onehot(pp2020):
    data = read_dataset(pp2020)
    assert data.label_format == "onehot" and not data.multilabel
    assert data.classes == list(synth.PP2020_CLASSES)
    assert data.id_column == "image_id"
    assert data.train.targets.shape == (64, 4)
    assert (data.train.targets.sum(1) == 1).all()
    assert len(data.test.ids) == 21 and data.test.csv == "test.csv"
    assert data.train.image_dir == data.test.image_dir == pp2020 / "images"


def test_pp2021_multilabel(tmp_path):
    _synth(tmp_path, "pp2021")
    data = read_dataset(tmp_path)
    assert data.label_format == "multilabel" and data.multilabel
    assert data.classes == sorted(synth.PP2021_CLASSES)
    assert data.id_column == "image"
    assert data.train.targets.shape == (16, 6)
    frame = pd.read_csv(tmp_path / "train.csv")
    for labels, row in zip(frame["labels"], data.train.targets):
        assert sorted(labels.split()) == [c for c, v in zip(data.classes, row) if v == 1]
    assert data.train.image_dir == tmp_path / "train_images"
    assert data.test.csv == "sample_submission.csv" and len(data.test.ids) == 3


def test_cassava_integer(tmp_path):
    _synth(tmp_path, "cassava")
    data = read_dataset(tmp_path)
    assert data.label_format == "integer" and not data.multilabel
    assert data.classes == list(synth.CASSAVA_CLASSES)  # from label_num_to_disease_map.json
    assert data.train.targets.shape == (16, 5)
    labels = pd.read_csv(tmp_path / "train.csv")["label"].to_numpy()
    assert np.array_equal(data.train.targets.argmax(1), labels)
    assert (data.train.targets.sum(1) == 1).all()


def test_integer_labels_with_a_gap_are_a_typo(tmp_path):
    _synth(tmp_path, "cassava")
    (tmp_path / "label_num_to_disease_map.json").unlink()
    data = read_dataset(tmp_path)
    assert data.classes == ["0", "1", "2", "3", "4"]  # the numbers found
    frame = pd.read_csv(tmp_path / "train.csv")
    row = int(np.flatnonzero(frame["label"].duplicated())[0])  # its class keeps an image
    frame.loc[row, "label"] = 40
    frame.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(UserError, match=rf"no row has label 5, 6, 7.* one has 40 \(row {row + 2} "):
        read_dataset(tmp_path)
    # Named classes make 40 an out-of-range label on its row.
    with pytest.raises(UserError, match=rf"row {row + 2} .*label '40' is not one of 0..4"):
        read_dataset(tmp_path, classes=list("abcde"))


def test_pp2021_trains_end_to_end_with_a_refreshed_cache(tmp_path):
    """synth -> prepare -> an image changes -> train --cache build: the entry is rebuilt first,
    BCE runs."""
    data_dir, out = tmp_path / "data", tmp_path / "runs"
    _synth(data_dir, "pp2021", n_train=24, n_test=2)
    prepared = run_cli("leaf_xla", "prepare", "--data-dir", str(data_dir), "--size", "32")
    assert prepared.returncode == 0, prepared.stderr
    assert "26 image(s) resized, 0 already fresh" in prepared.stdout

    data = read_dataset(data_dir)
    changed = data.train.paths[0]
    Image.new("RGB", (48, 32), (200, 30, 30)).save(changed, quality=95)  # new size and mtime
    cache = ResizeCache(default_cache_root(data_dir), 32)
    assert not cache.is_fresh(changed) and cache.is_fresh(data.train.paths[1])

    result = run_cli(
        "leaf_xla",
        "train",
        *("--model", "test_resnet", "--config", "demo", "--data-dir", str(data_dir)),
        *("--out-dir", str(out), "--epochs", "1", "--device", "cpu", "--image-size", "32"),
        *("--batch-size", "8", "--n-folds", "2", "--workers", "1", "--cache", "build"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cache: 1 image(s) resized" in result.stdout
    rebuilt = ResizeCache(default_cache_root(data_dir), 32)
    assert rebuilt.is_fresh(changed)
    assert np.array_equal(np.load(rebuilt.entry(changed)), decode(changed, 32)[0])

    oof = pd.read_csv(out / "test_resnet-fold0" / "oof.csv")
    assert list(oof.columns) == ["image_id", *sorted(synth.PP2021_CLASSES)]
    assert len(oof) == 12
    # Independent sigmoids (BCE), not a softmax: the rows do not sum to 1.
    assert not np.allclose(oof.iloc[:, 1:].sum(axis=1), 1, atol=0.05)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 64 wide, 48 high, a red block top-left; orientation 6: turn 90 degrees clockwise.
    array = np.full((48, 64, 3), 128, np.uint8)
    array[:12, :12] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    Image.fromarray(array).save(path, quality=95, exif=exif.tobytes())

    image, mode = decode(path)
    assert mode == "RGB"
    assert image.shape == (64, 48, 3)  # now 48 wide, 64 high
    red = np.array([255, 0, 0])
    assert np.abs(image[2:10, -10:-2].astype(int) - red).max() < 40  # top-right
    assert np.abs(image[2:10, 2:10].astype(int) - 128).max() < 40  # top-left is grey now
    small, _ = decode(path, 32)
    assert small.shape == (32, 32, 3)
    assert np.abs(small[1:5, -5:-1].astype(int) - red).max() < 60


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_decode_to_rgb(tmp_path, mode):
    path = tmp_path / "odd.jpg"
    Image.new("RGB", (40, 30), (30, 160, 60)).convert(mode).save(path, quality=95)
    image, original = decode(path, 16)
    assert original == mode
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    if mode == "CMYK":
        assert np.abs(image.astype(int) - (30, 160, 60)).max() < 30


@pytest.fixture(scope="module")
def big_leaf(tmp_path_factory):
    """A 2048x1365 leaf at quality 95 with fine noise: what the competition's photos are like."""
    rng = np.random.default_rng(7)
    leaf = np.asarray(synth.draw_leaf(rng, (2048, 1365), ["rust", "scab"], {"rust": 0, "scab": 1}))
    noisy = np.clip(leaf + rng.normal(0, 4, leaf.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("big") / "leaf.jpg"
    Image.fromarray(noisy).save(path, quality=95)
    return path


# Measured (libjpeg-turbo DCT-scaled decode + torch's antialiased bilinear, against Pillow 13):
# mean absolute difference 0.61 at 512 px, 0.65 at 256 px, 0.002 at 800 px (no DCT scale fits,
# so only the resize differs), on 0..255; decoding one DCT scale too small gives 1.27 and 0.85.
@pytest.mark.parametrize("size,bound", [(800, 0.05), (512, 1.0), (256, 1.0)])
def test_dct_scaled_decode_is_close_to_a_full_decode(big_leaf, size, bound):
    fast, _ = decode(big_leaf, size)
    with Image.open(big_leaf) as image:
        full = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    difference = np.abs(fast.astype(float) - np.asarray(full, dtype=float)).mean()
    assert fast.shape == (size, size, 3)
    assert difference < bound, difference


def test_plain_jpegs_take_the_turbo_path_and_match_pil(big_leaf, monkeypatch):
    calls = []
    fast_path = data_module._decode_turbo
    monkeypatch.setattr(
        data_module, "_decode_turbo", lambda *a: calls.append(a[1:]) or fast_path(*a)
    )
    fast, _ = decode(big_leaf, 300)
    assert calls == [(2048, 1365, (300, 300))]
    # The PIL path (taken for CMYK, EXIF turns, ...) gives the same image: one resize filter.
    monkeypatch.setattr(data_module, "_decode_turbo", lambda *a: "refused")
    slow, _ = decode(big_leaf, 300)
    assert np.abs(fast.astype(float) - slow).mean() < 0.5


@pytest.mark.parametrize("size,scale", [(800, 1), (512, 2), (300, 4), (160, 8)])
def test_the_turbo_decode_gives_opencvs_pixels(big_leaf, size, scale):
    """simplejpeg replaced OpenCV's decode for speed only: at every DCT scale the pixels are
    OpenCV's (the accurate integer IDCT), and the resize is still F.interpolate's, bit for bit."""
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}.get(scale)
    flag = flag or {4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    data = big_leaf.read_bytes()
    opencv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag), cv2.COLOR_BGR2RGB)
    assert opencv.shape[:2] == (-(-1365 // scale), -(-2048 // scale))
    chw = torch.from_numpy(opencv).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(chw, size=(size, size), mode="bilinear", antialias=True)
    assert np.array_equal(decode(big_leaf, size)[0], resized[0].permute(1, 2, 0).numpy())


def test_a_turned_photo_takes_the_turbo_path_exactly(big_leaf):
    """A portrait size on a landscape photo: decoded at 1/2 scale, resized in the file's own
    orientation, then turned a quarter counter-clockwise; the same pixels as done by hand."""
    data = big_leaf.read_bytes()
    half = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    chw = torch.from_numpy(cv2.cvtColor(half, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(chw, size=(512, 768), mode="bilinear", antialias=True)
    expected = np.rot90(resized[0].permute(1, 2, 0).numpy())  # counter-clockwise
    assert np.array_equal(decode(big_leaf, "768x512")[0], expected)


def test_only_plain_rgb_jpegs_take_the_turbo_path(tmp_path, monkeypatch):
    """Grayscale, CMYK, an EXIF turn, a PNG named .jpg and a full-size decode stay with PIL,
    which converts and turns them; libjpeg-turbo only sees what it decodes as PIL would."""
    calls = []
    fast_path = data_module._decode_turbo
    monkeypatch.setattr(
        data_module, "_decode_turbo", lambda *a: calls.append(a[1:]) or fast_path(*a)
    )
    rgb = Image.new("RGB", (40, 30), (30, 160, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "gray.jpg": lambda p: rgb.convert("L").save(p, "JPEG"),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, "JPEG"),
        "exif.jpg": lambda p: rgb.save(p, "JPEG", exif=exif.tobytes()),
        "png.jpg": lambda p: rgb.save(p, "PNG"),
    }
    for name, write in files.items():
        write(tmp_path / name)
        assert decode(tmp_path / name, 16)[0].shape == (16, 16, 3)
    plain = tmp_path / "plain.jpg"
    rgb.save(plain, "JPEG")
    assert decode(plain)[0].shape == (30, 40, 3)
    assert calls == []
    decode(plain, 16)
    assert calls == [(40, 30, (16, 16))]


@pytest.mark.parametrize("shape", [(40, 40), (37, 90), (120, 200), (300, 20)])
def test_resize_bilinear_is_f_interpolate_written_as_hwc(shape):
    """The out= form of torch's private resize op: the public F.interpolate's pixels, down, up
    and one side each way, in a C-contiguous HWC array (what the transforms and cache take)."""
    image = np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    resized = data_module.resize_bilinear(image, shape)
    chw = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    expected = F.interpolate(chw, size=shape, mode="bilinear", antialias=True)
    assert resized.flags.c_contiguous and resized.shape == (*shape, 3)
    assert np.array_equal(resized, expected[0].permute(1, 2, 0).numpy())


def test_a_jpeg_libjpeg_turbo_refuses_goes_to_pil_and_names_the_file(big_leaf, tmp_path):
    raw = bytearray(big_leaf.read_bytes())
    table = raw.index(b"\xff\xc4")  # a broken Huffman table; the file's ends stay whole
    raw[table + 5 : table + 21] = b"\xff" * 16
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(bytes(raw))
    refused = data_module._decode_turbo(bytes(raw), 2048, 1365, (512, 512))
    assert isinstance(refused, str) and "subsampling" in refused  # libjpeg-turbo's complaint
    with pytest.raises(data_module.DecodeError, match="broken.jpg"):
        decode(broken, 512)
