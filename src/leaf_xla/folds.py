"""Cross-validation folds, written once to a CSV that every model of an ensemble reuses.

K folds are stratified by class (scikit-learn's StratifiedKFold); multi-label data is stratified
by label combination (rare combinations pooled), so every fold sees every class. `holdout`
instead marks one stratified fraction as fold 0 and the rest as -1 (never validated).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from leaf_xla.cli import UserError
from leaf_xla.files import atomic_to_csv


def strata(targets: np.ndarray, n_splits: int) -> np.ndarray:
    """One stratum per sample: its class, or for multi-label data its label combination."""
    if (targets.sum(1) == 1).all():
        return targets.argmax(1)
    keys = np.array(["".join(map(str, row)) for row in targets.astype(int)])
    names, counts = np.unique(keys, return_counts=True)
    rare = set(names[counts < n_splits])
    return np.array(["rare" if k in rare else k for k in keys])


def make_folds(
    targets: np.ndarray, n_folds: int, seed: int, holdout: float | None = None
) -> np.ndarray:
    """Fold number per sample (-1: training only, with `holdout`)."""
    n = len(targets)
    if holdout is not None:
        if not 0 < holdout < 1:
            raise UserError(f"--holdout must be a fraction between 0 and 1, got {holdout}")
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=holdout, random_state=seed)
        labels = strata(targets, 2)
        _, val = next(splitter.split(np.zeros(n), labels))
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
    expected = 1 if holdout is not None else n_folds
    if path.is_file():
        frame = pd.read_csv(path, dtype={"image_id": str})
        if list(frame.columns[:2]) != ["image_id", "fold"]:
            raise UserError(f"{path}: expected columns image_id,fold; delete it to re-make folds")
        if sorted(frame["image_id"]) != sorted(ids):
            raise UserError(
                f"{path}: its image ids differ from train.csv's; delete it to re-make folds"
            )
        stored = int(frame["fold"].max()) + 1
        if stored != expected:
            raise UserError(
                f"{path} holds {stored} fold(s) but {expected} were asked for; delete it or "
                "pass another --folds-file"
            )
        return frame.set_index("image_id").loc[ids, "fold"].to_numpy()
    folds = make_folds(targets, n_folds, seed, holdout)
    atomic_to_csv(pd.DataFrame({"image_id": ids, "fold": folds}), path)
    return folds
