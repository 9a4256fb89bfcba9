"""The label format registry: detection, reading and writing labels, submissions, and the
generic `image_id,label` format end to end through the CLIs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, run_cli

from leaf_xla import formats, synth
from leaf_xla.data import read_dataset
from leaf_xla.errors import UserError
from leaf_xla.formats import FORMATS, LabelTable, format_submission


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        layout: synth.write_dataset(root / layout, 16, 3, seed=2, size=(32, 32), fmt=layout)
        for layout in synth.FORMATS
    }


@pytest.mark.parametrize("layout", synth.FORMATS)
def test_each_layout_is_detected_as_its_format(layout, layouts) -> None:
    frame = pd.read_csv(layouts[layout] / "train.csv", dtype=str)
    assert formats.detect(frame, layouts[layout]).name == synth.LAYOUT_FORMATS[layout]
    assert read_dataset(layouts[layout]).label_format == synth.LAYOUT_FORMATS[layout]


def table(frame: pd.DataFrame, tmp_path: Path) -> LabelTable:
    return LabelTable(frame, tmp_path / "train.csv", "image_id", tmp_path, [], [])


@pytest.mark.parametrize("name", FORMATS)
def test_labels_written_by_a_format_read_back_as_the_same_targets(name, tmp_path) -> None:
    fmt = FORMATS[name]
    classes = ["0", "1", "2"] if name == "integer" else ["blight", "healthy", "rust"]
    targets = np.eye(3, dtype=np.float32)[[0, 2, 1, 2, 0]]
    if fmt.multilabel:
        targets[1, 0] = 1  # a second label on one image
    frame = fmt.label_frame(targets, classes).astype(str)
    frame.insert(0, "image_id", [f"img{i}" for i in range(5)])
    read = table(frame, tmp_path)
    values, found = fmt.targets(read, [])
    assert read.errors == [] and found == classes
    np.testing.assert_array_equal(values, targets)


def test_integer_labels_are_cassava_and_names_are_generic(tmp_path) -> None:
    numbers = pd.DataFrame({"image_id": ["a", "b", "c"], "label": ["0", "2", "1"]})
    names = numbers.assign(label=["cat", "dog", "cat"])
    assert formats.detect(numbers, tmp_path).name == "integer"
    assert formats.detect(names, tmp_path).name == "generic"
    # Cassava's name map makes any label column numbered: a typo is an error, not a class.
    (tmp_path / formats.CASSAVA_NAMES).write_text(json.dumps({"0": "x", "1": "y", "2": "z"}))
    assert formats.detect(names, tmp_path).name == "integer"


def test_generic_classes_sorted_numbers_numerically_and_checked(tmp_path) -> None:
    generic = FORMATS["generic"]
    frame = pd.DataFrame({"image_id": list("abcd"), "label": ["10", "2", " 9", "2"]})
    read = table(frame, tmp_path)
    targets, classes = generic.targets(read, [])
    assert classes == ["2", "9", "10"]  # not "10" < "2"
    assert targets.argmax(1).tolist() == [2, 0, 1, 0]
    frame.loc[3, "label"] = ""
    read = table(frame, tmp_path)
    generic.targets(read, [])
    assert read.errors == ["train.csv row 5 (d): empty label (write the class name)"]
    with pytest.raises(UserError, match="labels 10 are not in the classes option"):
        generic.targets(table(frame, tmp_path), ["2", "9"])


def _probs(rows: list[list[float]], classes: list[str]) -> pd.DataFrame:
    ids = pd.Index([f"q{i}" for i in range(len(rows))], name="image_id")
    return pd.DataFrame(rows, index=ids, columns=classes)


def test_a_label_submission_follows_the_data_sets_format() -> None:
    probs = _probs([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]], ["blight", "healthy", "rust"])
    sample = pd.DataFrame({"image_id": ["q1", "q0"], "label": "healthy"})
    path = Path("sample_submission.csv")
    named = format_submission(probs, sample, path, label_format="generic")
    assert named.to_dict("list") == {"image_id": ["q1", "q0"], "label": ["blight", "healthy"]}
    numbered = format_submission(probs, sample.assign(label="2"), path, label_format="integer")
    assert numbered["label"].tolist() == [0, 1]
    # The sample's column keeps its name: `labels` with one name per image gets the top name.
    plural = format_submission(
        probs, sample.rename(columns={"label": "labels"}), path, 0.5, "generic"
    )
    assert plural.to_dict("list") == {"image_id": ["q1", "q0"], "labels": ["blight", "healthy"]}


@pytest.mark.parametrize(
    ("label_format", "value", "fragment"),
    [
        (
            "integer",
            "healthy",
            "column 'label' holds names (e.g. 'healthy') but train.csv's integer",
        ),
        ("generic", "3", "column 'label' holds numbers (e.g. '3') but train.csv's generic"),
        ("generic", "Healthy", "column 'label' holds Healthy, not a class of train.csv"),
    ],
)
def test_a_sample_whose_values_the_format_would_not_write_is_refused(
    label_format, value, fragment
) -> None:
    probs = _probs([[0.1, 0.7, 0.2]], ["blight", "healthy", "rust"])
    sample = pd.DataFrame({"image_id": ["q0"], "label": [value]})
    with pytest.raises(UserError, match=re.escape(fragment)):
        format_submission(probs, sample, Path("sample_submission.csv"), label_format=label_format)


def test_a_labels_column_with_one_name_per_row_is_single_label(tmp_path) -> None:
    frame = pd.DataFrame({"image_id": list("abcd"), "labels": ["rust", "healthy", "scab", "rust"]})
    assert formats.detect(frame, tmp_path).name == "generic"
    targets, classes = FORMATS["generic"].targets(table(frame, tmp_path), [])
    assert classes == ["healthy", "rust", "scab"] and targets.argmax(1).tolist() == [1, 0, 2, 1]
    numbers = frame.assign(labels=["0", "2", "1", "1"])
    assert formats.detect(numbers, tmp_path).name == "integer"
    several = frame.assign(labels=["rust scab", "healthy", "scab", "rust"])
    assert formats.detect(several, tmp_path).name == "multilabel"
    read = table(several, tmp_path)
    FORMATS["generic"].targets(read, [])  # --label-format generic on several names: row errors
    assert read.errors == [
        "train.csv row 2 (a): 2 labels (rust scab) where generic takes one; pass "
        "--label-format multilabel for several per image"
    ]


def test_unknown_format_names_the_choices() -> None:
    with pytest.raises(UserError, match="label_format must be one of onehot, multilabel"):
        formats.get("csv")


def test_generic_format_end_to_end(tmp_path) -> None:
    """synth -> check -> train one tiny epoch -> predict -> ensemble, on `image_id,label` data."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    result = run_cli(
        "leaf_xla", "synth", "--out", str(data), "--format", "generic", "--n-train", "32",
        "--n-test", "6", "--size", "48x40",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check = run_cli("leaf_xla", "check", "--data-dir", str(data))
    assert check.returncode == 0, check.stdout
    assert "label format: generic" in check.stdout and "OK: 0 error(s)" in check.stdout

    result = run_cli(
        "leaf_xla", "train", "--model", "test_resnet", "--config", "demo", "--epochs", "1",
        "--image-size", "32", "--batch-size", "8", "--device", "cpu",
        "--data-dir", str(data), "--out-dir", str(runs),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    oof = pd.read_csv(runs / "test_resnet-fold0" / "oof.csv")
    assert list(oof.columns)[1:] == list(synth.GENERIC_CLASSES)

    predictions = tmp_path / "pred.csv"
    result = run_cli(
        "leaf_xla", "predict", "--checkpoint", str(runs / "test_resnet-fold0" / "best.pt"),
        "--data-dir", str(data), "--out", str(predictions), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    probs = pd.read_csv(predictions).set_index("image_id")

    submission = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla", "ensemble", str(predictions), "--data-dir", str(data), "--out", str(submission)
    )
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(submission, dtype=str)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str)
    assert list(written.columns) == ["image_id", "label"]
    assert written["image_id"].tolist() == sample["image_id"].tolist()
    top = probs.loc[written["image_id"]].to_numpy().argmax(1)
    assert written["label"].tolist() == [synth.GENERIC_CLASSES[k] for k in top]

    rank = run_cli(
        "leaf_xla", "ensemble", str(predictions), "--method", "rank", "--data-dir", str(data),
        "--out", str(tmp_path / "rank.csv"),
    )  # fmt: skip
    assert_user_error(rank, "--method rank gives ranks", "use --method mean")


@pytest.mark.slow
def test_cassava_runs_are_scored_and_picked_by_accuracy(tmp_path) -> None:
    """Issue 22.2: Cassava is scored by accuracy: history.csv leads with val_accuracy (AUC kept
    beside it), best.pt is the most accurate epoch and says so; a checkpoint from before (only
    best_auc) still resumes and predicts."""
    import torch

    data, runs = tmp_path / "data", tmp_path / "runs"
    synth.write_dataset(data, 30, 4, seed=3, size=(40, 32), fmt="cassava")
    train = (
        "leaf_xla", "train", "--model", "test_resnet", "--config", "demo", "--image-size", "32",
        "--batch-size", "8", "--device", "cpu", "--data-dir", str(data), "--out-dir", str(runs),
    )  # fmt: skip
    result = run_cli(*train, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "test_resnet-fold0"
    for name in ("last.pt", "best.pt"):  # as written before checkpoints named their metric
        state = torch.load(run / name, weights_only=True)
        state["best_auc"] = state.pop("best_score")
        del state["metric"], state["best_ema_score"]
        torch.save(state, run / name)
    result = run_cli(*train, "--epochs", "2", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    history = pd.read_csv(run / "history.csv")
    assert list(history.columns[:6]) == [
        "epoch", "lr", "train_loss", "val_loss", "val_accuracy", "val_auc"
    ]  # fmt: skip
    assert f"best val accuracy {history['val_accuracy'].max():.4f}" in result.stdout

    best = torch.load(run / "best.pt", weights_only=True)
    assert best["metric"] == "accuracy"
    assert best["best_score"] == pytest.approx(history["val_accuracy"].max())
    oof = pd.read_csv(run / "oof.csv")
    labels = pd.read_csv(data / "train.csv", dtype={"label": int}).set_index("image_id")
    truth = labels.loc[oof["image_id"], "label"].to_numpy()
    accuracy = float((oof.iloc[:, 1:].to_numpy().argmax(1) == truth).mean())
    assert accuracy == pytest.approx(history["val_accuracy"].max())

    predictions = tmp_path / "pred.csv"
    result = run_cli(
        "leaf_xla", "predict", "--checkpoint", str(run / "best.pt"), "--data-dir", str(data),
        "--out", str(predictions), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_each_format_names_its_competitions_metric(layouts, tmp_path) -> None:
    from leaf_xla.metrics import resolve

    expected = {
        "pp2020": "auc",
        "pp2021": "f1_samples",
        "cassava": "accuracy",
        "generic": "accuracy",
    }
    for layout, metric in expected.items():
        data = read_dataset(layouts[layout])
        assert resolve("auto", data.label_format, data.multilabel).name == metric
    # One class per image is what accuracy scores: refused for multi-label data, before training.
    result = run_cli(
        "leaf_xla", "train", "--model", "test_resnet", "--metric", "accuracy", "--device", "cpu",
        "--data-dir", str(layouts["pp2021"]), "--out-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert_user_error(result, "--metric accuracy needs one class per image", "f1_samples")
    assert not (tmp_path / "runs" / "test_resnet-fold0").exists()
