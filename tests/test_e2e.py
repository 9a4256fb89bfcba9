"""End to end through the command lines, as a user runs them: synth -> train -> predict ->
ensemble -> submission.csv, and the demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import assert_user_error, run_cli

from leaf_xla.synth import PP2020_CLASSES

TINY = ["--config", "demo", "--epochs", "2", "--image-size", "32", "--batch-size", "8"]


def check_submission(path: Path, data: Path) -> pd.DataFrame:
    submission = pd.read_csv(path)
    assert list(submission.columns) == ["image_id", *PP2020_CLASSES]
    assert submission["image_id"].tolist() == pd.read_csv(data / "test.csv")["image_id"].tolist()
    values = submission[list(PP2020_CLASSES)].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-5)
    return submission


def test_cli_pipeline(tmp_path) -> None:
    console = Path(sys.executable).with_name("leaf-xla")
    data, runs = tmp_path / "data", tmp_path / "runs"
    synth = (
        [str(console), "synth"] if console.exists() else [sys.executable, "-m", "leaf_xla", "synth"]
    )
    result = subprocess.run(
        [*synth, "--out", str(data), "--n-train", "48", "--n-test", "13", "--size", "64x48"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr

    predictions = []
    for model in ("test_resnet", "test_efficientnet"):
        result = run_cli(
            "leaf_xla",
            "train",
            "--model",
            model,
            "--data-dir",
            str(data),
            "--out-dir",
            str(runs),
            "--device",
            "xla",
            *TINY,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = runs / f"{model}-fold0"
        assert f"run directory: {run_dir}" in result.stdout
        for name in ("best.pt", "last.pt", "config.yaml", "history.csv", "oof.csv"):
            assert (run_dir / name).is_file(), name
        oof = pd.read_csv(run_dir / "oof.csv")
        folds = pd.read_csv(runs / "folds.csv")
        assert sorted(oof["image_id"]) == sorted(folds.loc[folds.fold == 0, "image_id"])
        assert len(pd.read_csv(run_dir / "history.csv")) == 2

        out = tmp_path / f"{model}.csv"
        result = run_cli(
            "leaf_xla",
            "predict",
            "--checkpoint",
            str(run_dir / "best.pt"),
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--tta",
            "none",
            "hflip",
            "--batch-size",
            "8",
            "--device",
            "xla",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        check_submission(out, data)
        predictions.append(out)

    submission = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla",
        "ensemble",
        *map(str, predictions),
        "--weights",
        "0.7",
        "0.3",
        "--data-dir",
        str(data),
        "--out",
        str(submission),
    )
    assert result.returncode == 0, result.stderr
    ours = check_submission(submission, data)
    a, b = (pd.read_csv(p)[list(PP2020_CLASSES)].to_numpy() for p in predictions)
    np.testing.assert_allclose(ours[list(PP2020_CLASSES)].to_numpy(), 0.7 * a + 0.3 * b, atol=1e-6)

    # An existing submission is never replaced by accident.
    before = submission.read_bytes()
    result = run_cli("leaf_xla", "ensemble", *map(str, predictions), "--out", str(submission))
    assert_user_error(result, str(submission), "--overwrite")
    assert submission.read_bytes() == before


def test_bad_invocations_are_one_line_errors(tmp_path, pp2020) -> None:
    cases = [
        (
            ["leaf_xla", "train", "--model", "test_resnet", "--data-dir", str(tmp_path / "nope")],
            "data directory",
        ),
        (
            ["leaf_xla", "train", "--model", "no_such_net", "--data-dir", str(pp2020)],
            "--model no_such_net",
        ),
        (["leaf_xla", "train", "--data-dir", str(pp2020)], "--model is required"),
        (
            [
                "leaf_xla",
                "predict",
                "--checkpoint",
                str(tmp_path / "x.pt"),
                "--data-dir",
                str(pp2020),
                "--out",
                str(tmp_path / "p.csv"),
            ],
            "x.pt not found",
        ),
    ]
    for argv, fragment in cases:
        assert_user_error(
            run_cli(*argv, "--device", "cpu") if argv[1] == "train" else run_cli(*argv),
            fragment,
        )
    broken = tmp_path / "data"
    shutil.copytree(pp2020, broken)
    (broken / "train.csv").unlink()
    assert_user_error(
        run_cli("leaf_xla", "train", "--model", "test_resnet", "--data-dir", str(broken)),
        "train.csv not found",
    )


def test_demo(tmp_path) -> None:
    """The README's first command: the whole job on generated data, under 5 minutes."""
    result = run_cli("leaf_xla", "demo", "--out-dir", str(tmp_path / "demo"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["models"]) == {"test_efficientnet", "test_resnet"}
    assert summary["ensemble"] >= 0.9, summary
    check_submission(tmp_path / "demo" / "submission.csv", tmp_path / "demo" / "data")
    assert "ensemble" in result.stdout and "submission:" in result.stdout
    assert "on 1 xla replica(s)" in result.stdout  # the demo asks for XLA (auto would not)
