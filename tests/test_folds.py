"""Folds: seeded, stratified (single- and multi-label), holdout, and the shared folds file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from leaf_xla.errors import UserError
from leaf_xla.folds import load_or_create, make_folds

# Plant Pathology 2020's class balance (516/91/622/592), scaled to 300 images.
COUNTS = (85, 15, 103, 97)


def onehot(counts=COUNTS, seed: int = 0) -> np.ndarray:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    return np.eye(len(counts), dtype=np.float32)[labels]


def multihot(n: int = 240, seed: int = 0) -> np.ndarray:
    """Six classes; mostly one label, some two, a few rare triples."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((n, 6), np.float32)
    for row in targets:
        k = rng.choice([1, 2, 3], p=[0.75, 0.23, 0.02])
        row[rng.choice(6, size=k, replace=False)] = 1
    return targets


def test_same_seed_same_folds_other_seed_other_folds():
    targets = onehot()
    first = make_folds(targets, 5, seed=42)
    assert np.array_equal(first, make_folds(targets, 5, seed=42))
    assert not np.array_equal(first, make_folds(targets, 5, seed=43))


@pytest.mark.parametrize("n_folds", [3, 5])
def test_every_fold_holds_each_class_in_proportion(n_folds):
    targets = onehot()
    folds = make_folds(targets, n_folds, seed=0)
    assert sorted(set(folds.tolist())) == list(range(n_folds))
    labels = targets.argmax(1)
    for k in range(n_folds):
        for c, total in enumerate(COUNTS):
            got = int(((folds == k) & (labels == c)).sum())
            assert abs(got - total / n_folds) <= 1, (k, c, got, total / n_folds)


def test_multilabel_folds_see_every_class():
    targets = multihot()
    folds = make_folds(targets, 5, seed=0)
    assert sorted(set(folds.tolist())) == list(range(5))
    per_class = targets.sum(0)
    for k in range(5):
        held = targets[folds == k].sum(0)
        assert (held > 0).all(), (k, held)
        # Stratified by combination: each class near its share (loose: combinations, not classes).
        assert np.all(np.abs(held - per_class / 5) <= 0.25 * per_class / 5 + 2), (k, held)


def test_holdout_marks_a_stratified_fraction():
    targets = onehot()
    folds = make_folds(targets, 5, seed=0, holdout=0.2)
    assert set(folds.tolist()) == {-1, 0}
    assert (folds == 0).sum() == 60
    labels = targets.argmax(1)
    for c, total in enumerate(COUNTS):
        assert abs(((folds == 0) & (labels == c)).sum() - 0.2 * total) <= 1


def test_too_few_images_of_a_class_is_a_user_error():
    with pytest.raises(UserError, match="only 3 image"):
        make_folds(onehot((20, 3, 20)), 5, seed=0)
    with pytest.raises(UserError, match="--holdout"):
        make_folds(onehot(), 5, seed=0, holdout=1.5)


def test_folds_file_is_written_once_and_reused(tmp_path):
    targets = onehot()
    ids = [f"Train_{i}" for i in range(len(targets))]
    path = tmp_path / "folds.csv"
    first = load_or_create(path, ids, targets, 5, seed=1)
    written = path.read_text()
    assert list(pd.read_csv(path).columns) == ["image_id", "fold"]
    # Another seed and another id order: the file wins, in the caller's order.
    shuffled = np.random.default_rng(0).permutation(len(ids))
    again = load_or_create(path, [ids[i] for i in shuffled], targets[shuffled], 5, seed=99)
    assert np.array_equal(again, first[shuffled])
    assert path.read_text() == written


def test_folds_file_mismatches_are_user_errors(tmp_path):
    targets = onehot()
    ids = [f"Train_{i}" for i in range(len(targets))]
    path = tmp_path / "folds.csv"
    load_or_create(path, ids, targets, 5, seed=0)
    with pytest.raises(UserError, match="holds 5 folds but --n-folds 4"):
        load_or_create(path, ids, targets, 4, seed=0)
    with pytest.raises(UserError, match="ids differ.*Train_x"):
        load_or_create(path, [*ids[:-1], "Train_x"], targets, 5, seed=0)
    with pytest.raises(UserError, match="not --holdout 0.2"):
        load_or_create(path, ids, targets, 5, seed=0, holdout=0.2)

    held = tmp_path / "holdout.csv"
    load_or_create(held, ids, targets, 5, seed=0, holdout=0.2)
    assert np.array_equal(
        load_or_create(held, ids, targets, 5, seed=0, holdout=0.2),
        make_folds(targets, 5, 0, holdout=0.2),
    )
    with pytest.raises(UserError, match="60 of 300 held out, not --holdout 0.3"):
        load_or_create(held, ids, targets, 5, seed=0, holdout=0.3)
    with pytest.raises(UserError, match="holdout split but --n-folds 5"):
        load_or_create(held, ids, targets, 5, seed=0)

    broken = tmp_path / "broken.csv"
    broken.write_text("id,fold\nTrain_0,0\n")
    with pytest.raises(UserError, match="expected columns image_id,fold"):
        load_or_create(broken, ids, targets, 5, seed=0)
    broken.write_text("image_id,fold\n" + "".join(f"{i},x\n" for i in ids))
    with pytest.raises(UserError, match="whole numbers"):
        load_or_create(broken, ids, targets, 5, seed=0)
