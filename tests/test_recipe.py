"""leaf_xla.recipe end to end (train -> predict -> ensemble) on a tiny set, and its --resume.

The recipe runs on the plain CPU device to stay quick: the XLA paths of train and predict have
their own tests, and the recipe only passes --device on.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_cli

from leaf_xla.cli import UserError
from leaf_xla.recipe import load_recipe

CLASSES = ["healthy", "multiple_diseases", "rust", "scab"]
RECIPE = """\
folds: [0]
tta: [none, hflip]
models:
  - name: a
    config: demo
    weight: 3
    args: {model: test_resnet}
  - name: b
    config: demo
    weight: 1
    args: {model: test_resnet, seed: 1}
"""


def recipe(config: Path, data: Path, out: Path, *options: str):
    return run_cli(
        "leaf_xla.recipe",
        *("--config", str(config), "--data-dir", str(data), "--out-dir", str(out)),
        *("--device", "cpu", *options, "--", "--epochs", "1", "--image-size", "32"),
    )


def test_recipe_end_to_end_and_resume(pp2020: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(RECIPE)
    out = tmp_path / "runs"
    first = recipe(config, pp2020, out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]

    submission = pd.read_csv(out / "submission.csv")
    test_ids = pd.read_csv(pp2020 / "test.csv")["image_id"].tolist()
    assert list(submission.columns) == ["image_id", *CLASSES]
    assert submission["image_id"].tolist() == test_ids
    values = submission[CLASSES].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(values.sum(1), 1, atol=1e-5)
    a, b = (pd.read_csv(out / "predictions" / f"{n}.csv")[CLASSES].to_numpy() for n in "ab")
    np.testing.assert_allclose(values, 0.75 * a + 0.25 * b, atol=1e-6)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"] == {"a": 0.75, "b": 0.25}
    assert set(summary["models"]) == {"a", "b"} and 0 <= summary["ensemble"] <= 1
    assert set(summary["runs"]) == {"a-fold0", "b-fold0"}
    assert summary["validation_images"] == 16  # fold 0 of the demo config's 4
    assert (out / "submission_roc.png").is_file()

    # Without --resume the finished runs are not touched.
    again = recipe(config, pp2020, out)
    assert_user_error(again, "a-fold0", "--resume")

    # b as if killed before its first epoch ended: resumed, while train finds a finished (train
    # decides, so that the hosts of a pod decide together); the weights are fitted this time.
    state = torch.load(out / "b-fold0" / "last.pt", map_location="cpu", weights_only=True)
    state.update(epoch=0, step=0, history=[], best_auc=-math.inf, flat_epochs=0)
    torch.save(state, out / "b-fold0" / "last.pt")
    resumed = recipe(config, pp2020, out, "--resume", "--fit-weights")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"nothing to resume: {out / 'a-fold0'} is finished" in resumed.stdout
    trains = [line for line in resumed.stdout.splitlines() if line.startswith("$ leaf_xla.train")]
    assert len(trains) == 2 and all(t.endswith("--resume") for t in trains)
    assert "a-fold0" in trains[0] and "b-fold0" in trains[1]
    assert "resuming" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["b-fold0"]["epochs"] == 1
    assert summary["weights_from"] in ("fitted", "equal: fitted weights overfit")
    assert sum(summary["weights"].values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("models: []", "non-empty list"),
        ("epochs: 3\nmodels: [{name: a}]", "unknown key(s) epochs"),
        ("folds: 0\nmodels: [{name: a}]", "'folds' must be a list"),
        ("tta: [rotate]\nmodels: [{name: a}]", "'tta' must be a list of"),
        ("models: [{name: a, weight: heavy}]", "weight must be a number"),
        ("models: [{name: a}, {name: a}]", "model names must differ"),
        ("models: [{name: a, args: [x]}]", "args must be a mapping"),
    ],
)
def test_bad_recipe_configs(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_recipe(path)


def test_missing_weights_file_fails_before_any_training(pp2020: Path, tmp_path: Path) -> None:
    """The shipped ensemble needs converted Keras weights for its ResNet: say so up front,
    not after the EfficientNets have trained for hours."""
    result = run_cli(
        "leaf_xla.recipe",
        "--config",
        "ensemble",
        "--data-dir",
        str(pp2020),
        "--out-dir",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    assert_user_error(
        result, "keras_resnet152v2", "resnet152v2_imagenet.safetensors", "convert_keras"
    )
    assert not (tmp_path / "runs" / "tf_efficientnet_b7-fold0").exists()


def test_recipe_checks_tta_names_without_the_engine() -> None:
    code = "import sys, leaf_xla.recipe; assert 'leaf_xla.engine' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
