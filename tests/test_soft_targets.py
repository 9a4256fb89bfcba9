"""`train --soft-targets CSV`: the file's checks, the targets it replaces (training images only),
and a resume that refuses other soft targets. The loss itself: test_engine.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_cli

from leaf_xla import train
from leaf_xla.commands.options import parse_args, train_settings
from leaf_xla.commands.train import build_parser
from leaf_xla.data import read_dataset
from leaf_xla.errors import UserError
from leaf_xla.metrics import column_auc
from leaf_xla.preflight import plan_run
from leaf_xla.soft_targets import digest, read_soft_targets

CLASSES = ["healthy", "multiple_diseases", "rust", "scab"]
IDS = [f"Train_{i}" for i in range(4)]


def soft_frame(ids: list[str], seed: int = 0) -> pd.DataFrame:
    """Random distributions over the classes, one row per id."""
    rows = np.random.default_rng(seed).dirichlet(np.ones(len(CLASSES)), size=len(ids))
    frame = pd.DataFrame(rows, columns=CLASSES)
    frame.insert(0, "image_id", ids)
    return frame


def read(path: Path, multilabel: bool = False) -> pd.DataFrame:
    return read_soft_targets(
        path, train_ids=IDS, needed=IDS[:3], classes=CLASSES, multilabel=multilabel
    )


def test_reads_rows_in_class_order_and_ignores_extra_training_images(tmp_path: Path) -> None:
    frame = soft_frame(IDS)
    path = tmp_path / "soft.csv"
    frame[["image_id", *CLASSES[::-1]]].to_csv(path, index=False)
    soft = read(path)
    assert list(soft.columns) == CLASSES
    np.testing.assert_array_equal(soft.loc[IDS].to_numpy(), frame[CLASSES].to_numpy())
    # The digest covers the rows trained on, exactly: another value anywhere in them changes it.
    before = digest(soft, IDS[:3])
    soft.iloc[1, 2] += 1e-12
    assert digest(soft, IDS[:3]) != before


@pytest.mark.parametrize(
    "edit, multilabel, fragment",
    [
        (lambda f: f.drop(index=1), False, "no row for 1 training image(s): Train_1"),
        (lambda f: f.rename(columns={"scab": "mildew"}), False, "must be the class names"),
        (lambda f: f.assign(rust=np.where(f.index == 2, np.nan, f.rust)), False, "row 4 (Train_2)"),
        (lambda f: f.assign(rust=f.rust + np.where(f.index == 0, 0.01, 0)), False, "row 2"),
        (lambda f: f.assign(rust=np.where(f.index == 1, 1.5, f.rust)), True, "row 3 (Train_1)"),
        (lambda f: pd.concat([f, f.iloc[[0]]]), False, "row 6: duplicate image id Train_0"),
        (lambda f: f.assign(image_id=[*IDS[:3], "Test_9"]), False, "'Test_9' is not in train"),
    ],
)
def test_bad_files_name_file_and_row(tmp_path: Path, edit, multilabel: bool, fragment) -> None:
    path = tmp_path / "soft.csv"
    edit(soft_frame(IDS)).to_csv(path, index=False)
    with pytest.raises(UserError, match="soft.csv") as err:
        read(path, multilabel)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_multilabel_rows_need_not_sum_to_one(tmp_path: Path) -> None:
    path = tmp_path / "soft.csv"
    soft_frame(IDS).assign(rust=1.0).to_csv(path, index=False)
    assert read(path, multilabel=True)["rust"].eq(1.0).all()
    with pytest.raises(UserError, match="summing to 1"):
        read(path, multilabel=False)


def test_soft_targets_replace_training_targets_only(pp2020: Path, tmp_path: Path) -> None:
    ids = read_dataset(pp2020).train.ids
    path = tmp_path / "soft.csv"
    soft_frame(ids, seed=3).to_csv(path, index=False)
    argv = [
        *("--data-dir", str(pp2020), "--out-dir", str(tmp_path / "runs"), "--config", "demo"),
        *("--model", "test_resnet", "--device", "cpu", "--soft-targets", str(path)),
    ]
    plan = plan_run(train_settings(parse_args(build_parser(), argv)))
    run = train.build(plan)
    labels = plan.data.train.targets
    rows = pd.read_csv(path).set_index("image_id").loc[[ids[i] for i in plan.train_index]]
    np.testing.assert_array_equal(run.train_set.targets, rows[CLASSES].to_numpy(np.float32))
    np.testing.assert_array_equal(run.val_set.targets, labels[plan.val_index])
    assert plan.soft_digest is not None
    assert run.meta["resume_identity"]["soft_targets"] == plan.soft_digest


@pytest.mark.slow
def test_train_with_soft_targets_scores_true_labels_and_resume_checks_them(
    pp2020: Path, tmp_path: Path
) -> None:
    ids = read_dataset(pp2020).train.ids
    first, second = tmp_path / "soft.csv", tmp_path / "other.csv"
    soft_frame(ids, seed=1).to_csv(first, index=False)
    soft_frame(ids, seed=2).to_csv(second, index=False)
    out = tmp_path / "runs"
    args = [
        *(
            "leaf_xla",
            "train",
            "--data-dir",
            str(pp2020),
            "--out-dir",
            str(out),
            "--config",
            "demo",
        ),
        *("--model", "test_resnet", "--image-size", "32", "--epochs", "1", "--device", "cpu"),
        *("--workers", "1", "--cache", "off"),
    ]
    result = run_cli(*args, "--soft-targets", str(first))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = out / "test_resnet-fold0"
    history = pd.read_csv(run_dir / "history.csv")
    oof = pd.read_csv(run_dir / "oof.csv").set_index("image_id")
    labels = pd.read_csv(pp2020 / "train.csv").set_index("image_id").loc[oof.index, CLASSES]
    aucs = column_auc(labels.to_numpy(), oof[CLASSES].to_numpy())
    assert history["val_auc"].iloc[0] == pytest.approx(float(np.nanmean(aucs)), abs=1e-6)
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert state["resume_identity"]["soft_targets"] is not None

    resumed = run_cli(*args, "--epochs", "2", "--resume", "--soft-targets", str(second))
    assert_user_error(resumed, "soft targets: other training targets", "--force-resume")
    # A training image without a row (validation images need none).
    folds = pd.read_csv(out / "folds.csv")
    trains = folds.loc[folds["fold"] != 0, "image_id"].iloc[0]
    bad = tmp_path / "bad.csv"
    soft_frame([i for i in ids if i != trains]).to_csv(bad, index=False)
    refused = run_cli(*args, "--run-name", "other", "--soft-targets", str(bad))
    assert_user_error(refused, str(bad), "no row for 1 training image(s)", trains)
