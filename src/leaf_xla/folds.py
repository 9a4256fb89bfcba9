"""Cross-validation folds, written once to a CSV that every model of an ensemble reuses.

K folds are stratified by class (scikit-learn's StratifiedKFold); multi-label data is stratified
by label combination (rare combinations pooled), so every fold sees every class. `holdout`
instead marks one stratified fraction as fold 0 and the rest as -1 (never validated).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from leaf_xla.errors import UserError
from leaf_xla.files import atomic_to_csv


def strata(targets: np.ndarray, n_splits: int) -> np.ndarray:
    """One stratum per sample: its class, or for multi-label data its label combination."""
    if (targets.sum(1) == 1).all():
        return targets.argmax(1)
    keys = np.array(["".join(map(str, row)) for row in targets.astype(int)], dtype=object)
    names, counts = np.unique(keys, return_counts=True)
    rare = np.isin(keys, names[counts < n_splits])
    if rare.sum() >= n_splits:
        keys[rare] = "rare"
    elif rare.any():
        # Too few even pooled: they join the commonest combination.
        keys[rare] = names[counts.argmax()]
    return keys


def make_folds(
    targets: np.ndarray, n_folds: int, seed: int, holdout: float | None = None
) -> np.ndarray:
    """Fold number per sample (-1: training only, with `holdout`)."""
    n = len(targets)
    if holdout is not None:
        if not 0 < holdout < 1:
            raise UserError(f"--holdout must be a fraction between 0 and 1, got {holdout}")
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=holdout, random_state=seed)
        try:
            _, val = next(splitter.split(np.zeros(n), strata(targets, 2)))
        except ValueError as err:  # a fraction too small to hold every class
            raise UserError(f"--holdout {holdout}: {str(err).splitlines()[0]}") from None
        folds = np.full(n, -1)
        folds[val] = 0
        return folds
    if n_folds < 2:
        raise UserError(f"--n-folds must be at least 2 (or use --holdout), got {n_folds}")
    labels = strata(targets, n_folds)
    smallest = np.unique(labels, return_counts=True)[1].min()
    if smallest < n_folds:
        raise UserError(
            f"--n-folds {n_folds}: a class has only {smallest} image(s); use fewer folds"
        )
    folds = np.zeros(n, dtype=int)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(n), labels)):
        folds[val] = k
    return folds


def load_or_create(
    path: Path,
    ids: list[str],
    targets: np.ndarray,
    n_folds: int,
    seed: int,
    holdout: float | None = None,
) -> np.ndarray:
    """Folds from `path` if it exists (checked against the data), else made and written there."""
    if path.is_file():
        return _load(path, ids, n_folds, holdout)
    folds = make_folds(targets, n_folds, seed, holdout)
    atomic_to_csv(pd.DataFrame({"image_id": ids, "fold": folds}), path)
    return folds


def _load(path: Path, ids: list[str], n_folds: int, holdout: float | None) -> np.ndarray:
    remake = "delete it to re-make folds, or pass another --folds-file"
    frame = pd.read_csv(path, dtype={"image_id": str})
    if list(frame.columns[:2]) != ["image_id", "fold"]:
        raise UserError(f"{path}: expected columns image_id,fold; {remake}")
    folds = pd.to_numeric(frame["fold"], errors="coerce")
    if folds.isna().any() or (folds < -1).any() or (folds != folds.round()).any():
        raise UserError(f"{path}: fold values must be whole numbers from -1 up; {remake}")
    stored_ids = frame["image_id"].fillna("").tolist()
    if sorted(stored_ids) != sorted(ids):
        unknown = sorted(set(ids) - set(stored_ids))[:3]
        detail = f" (not in it: {', '.join(unknown)})" if unknown else ""
        raise UserError(f"{path}: its image ids differ from train.csv's{detail}; {remake}")
    fold_of = pd.Series(folds.astype(int).to_numpy(), index=stored_ids).loc[ids].to_numpy()
    stored_holdout = (fold_of == -1).any()
    stored = int(fold_of.max()) + 1
    if holdout is None and (stored_holdout or stored != n_folds):
        kind = "a holdout split" if stored_holdout else f"{stored} folds"
        raise UserError(f"{path} holds {kind} but --n-folds {n_folds} was asked for; {remake}")
    if holdout is not None:
        expected = math.ceil(holdout * len(ids))  # StratifiedShuffleSplit's rounding
        held = int((fold_of == 0).sum())
        if not stored_holdout or stored != 1 or abs(held - expected) > 1:
            kind = f"{held} of {len(ids)} held out" if stored_holdout else f"{stored} folds"
            raise UserError(
                f"{path} holds {kind}, not --holdout {holdout} ({expected} images); {remake}"
            )
    return fold_of
