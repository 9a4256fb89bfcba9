"""leaf_xla.predict on the XLA CPU device: padding, TTA, checkpoint averaging, OOF, bad inputs.

One tiny model is trained once per session; predictions run in this process (the compiled graphs
are reused between tests), the error cases as a user's subprocess.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_cli
from PIL import Image

from leaf_xla.commands.predict import main as predict_main
from leaf_xla.data import decode

CLASSES = ["healthy", "multiple_diseases", "rust", "scab"]


@pytest.fixture(scope="session")
def run_dir(pp2020: Path, tmp_path_factory) -> Path:
    """test_resnet trained for one epoch at 32 px: best.pt, oof.csv (fold 0 of 4)."""
    out = tmp_path_factory.mktemp("predict_runs")
    result = run_cli(
        "leaf_xla",
        "train",
        *("--model", "test_resnet", "--config", "demo", "--data-dir", str(pp2020)),
        *("--out-dir", str(out), "--epochs", "1", "--image-size", "32", "--device", "xla"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "test_resnet-fold0"


def predict(out: Path, checkpoints: list[Path], data: Path, *options: str) -> pd.DataFrame:
    predict_main(
        [
            *("--checkpoint", *map(str, checkpoints), "--data-dir", str(data)),
            *("--out", str(out), "--batch-size", "8", "--workers", "2"),
            *("--device", "xla", *options),  # this file tests the XLA path (options may differ)
        ]
    )
    return pd.read_csv(out)


def probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[CLASSES].to_numpy()


def test_every_test_image_once_in_sample_order(run_dir: Path, pp2020: Path, tmp_path) -> None:
    """21 images in batches of 8: the padded last batch adds nothing and loses nothing."""
    best = run_dir / "best.pt"
    xla = predict(tmp_path / "xla.csv", [best], pp2020, "--device", "xla")
    sample = pd.read_csv(pp2020 / "sample_submission.csv")
    assert list(xla.columns) == ["image_id", *CLASSES]
    assert xla["image_id"].tolist() == sample["image_id"].tolist()
    assert len(sample) == 21 and xla["image_id"].is_unique
    np.testing.assert_allclose(probs(xla).sum(1), 1, atol=1e-5)
    # Plain CPU in batches of 5 gives the same numbers, so batching and padding change nothing.
    cpu = predict(tmp_path / "cpu.csv", [best], pp2020, "--device", "cpu", "--batch-size", "5")
    np.testing.assert_allclose(probs(cpu), probs(xla), atol=1e-5)


def _flipped_copy(source: Path, dest: Path, flip: bool) -> Path:
    """The data set with its test images replaced by lossless 32 px arrays (PNG bytes), flipped
    left-right when asked: at the model's size nothing is resized, so the pixels are exact."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".leaf_xla_cache"))
    for image_id in pd.read_csv(source / "test.csv")["image_id"]:
        path = dest / "images" / f"{image_id}.jpg"
        array = decode(path, 32)[0]
        Image.fromarray(np.ascontiguousarray(array[:, ::-1] if flip else array)).save(
            path, format="PNG"
        )
    return dest


def test_tta(run_dir: Path, pp2020: Path, tmp_path) -> None:
    best = [run_dir / "best.pt"]
    plain = _flipped_copy(pp2020, tmp_path / "plain", flip=False)
    mirrored = _flipped_copy(pp2020, tmp_path / "mirrored", flip=True)
    none = probs(predict(tmp_path / "none.csv", best, plain, "--tta", "none"))
    hflip = probs(predict(tmp_path / "hflip.csv", best, plain, "--tta", "hflip"))
    both = probs(predict(tmp_path / "both.csv", best, plain, "--tta", "none", "hflip"))
    assert np.abs(hflip - none).max() > 1e-4  # the flip reaches the model
    np.testing.assert_allclose(both, (none + hflip) / 2, atol=1e-6)
    # hflip TTA is exactly the prediction for left-right mirrored images.
    of_mirrored = probs(predict(tmp_path / "mirror.csv", best, mirrored, "--tta", "none"))
    np.testing.assert_allclose(hflip, of_mirrored, atol=1e-5)


def _perturbed(best: Path, dest: Path, **changes) -> Path:
    """A copy of a checkpoint with its weights moved (a stand-in for another fold's model)."""
    state = torch.load(best, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    state["model"] = {
        k: v + 0.2 * torch.randn(v.shape, generator=gen) if v.ndim >= 2 else v
        for k, v in state["model"].items()
    }
    torch.save({**state, **changes}, dest)
    return dest


def test_checkpoints_are_averaged(run_dir: Path, pp2020: Path, tmp_path) -> None:
    best = run_dir / "best.pt"
    other = _perturbed(best, tmp_path / "other.pt")
    one = probs(predict(tmp_path / "one.csv", [best], pp2020))
    two = probs(predict(tmp_path / "two.csv", [other], pp2020))
    both = probs(predict(tmp_path / "both.csv", [best, other], pp2020))
    assert np.abs(one - two).max() > 1e-3
    np.testing.assert_allclose(both, (one + two) / 2, atol=1e-6)


def test_split_train_matches_the_runs_oof(run_dir: Path, pp2020: Path, tmp_path) -> None:
    oof = pd.read_csv(run_dir / "oof.csv")
    again = predict(tmp_path / "oof.csv", [run_dir / "best.pt"], pp2020, "--split", "train")
    assert sorted(again["image_id"]) == sorted(oof["image_id"])
    again = again.set_index("image_id").loc[oof["image_id"]]
    np.testing.assert_allclose(again[CLASSES].to_numpy(), probs(oof), atol=1e-5)


@pytest.mark.parametrize("case", ["missing", "corrupt", "other classes", "out exists"])
def test_bad_inputs_are_user_errors(run_dir: Path, pp2020: Path, tmp_path, case: str) -> None:
    best = run_dir / "best.pt"
    checkpoints, out, fragments = [best], tmp_path / "out.csv", []
    if case == "missing":
        checkpoints.append(tmp_path / "gone.pt")
        fragments = ["gone.pt", "not found"]
    elif case == "corrupt":
        cut = tmp_path / "cut.pt"
        cut.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
        checkpoints.append(cut)
        fragments = ["cut.pt", "is truncated"]
    elif case == "other classes":
        checkpoints.append(_perturbed(best, tmp_path / "other.pt", classes=CLASSES[::-1]))
        fragments = ["other.pt", "classes", "differ"]
    else:
        out.write_text("keep me\n")
        fragments = [str(out), "--overwrite"]
    result = run_cli(
        "leaf_xla",
        "predict",
        *("--checkpoint", *map(str, checkpoints), "--data-dir", str(pp2020), "--out", str(out)),
    )
    assert_user_error(result, *fragments)
    assert out.read_text() == "keep me\n" if case == "out exists" else not out.exists()
