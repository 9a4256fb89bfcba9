"""Per-image target distributions for training (`train --soft-targets CSV`), and the mixed
targets of self-distillation that the recipe writes.

A soft-target CSV has an image id column and one column per class. Single-label data: each row
is a distribution over the classes (values in [0, 1] summing to 1 within 1e-3), used by the
softmax cross-entropy as is. Multi-label data: each value is that class's probability in [0, 1],
the target of its sigmoid's binary cross-entropy. The rows replace the one-hot (multi-hot)
labels of the training images only; validation is always scored on the true labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla.data import read_csv
from leaf_xla.errors import UserError, first_few
from leaf_xla.formats import id_column

ROW_SUM_TOLERANCE = 1e-3


def read_soft_targets(
    path: Path,
    *,
    train_ids: Sequence[str],
    needed: Sequence[str],
    classes: Sequence[str],
    multilabel: bool,
) -> pd.DataFrame:
    """The CSV's rows as float64, indexed by image id, columns in `classes` order, checked.

    `train_ids`: train.csv's ids (any other id is an error: the file is for another data set);
    `needed`: the ids that must have a row (the run's training images).
    """
    frame = read_csv(path, missing="expected a soft-target CSV (image_id and one column per class)")
    ids = id_column(frame, path)
    if frame.empty:
        raise UserError(f"{path}: no rows under the header")
    columns = [c for c in frame.columns if c != ids]
    if sorted(columns) != sorted(classes):
        raise UserError(
            f"{path}: columns {columns} after {ids} must be the class names {list(classes)}"
        )
    frame[ids] = frame[ids].fillna("").str.strip()
    duplicated = frame[ids].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise UserError(f"{path} row {row + 2}: duplicate image id {frame[ids].iloc[row]}")
    unknown = np.flatnonzero(~frame[ids].isin(set(train_ids)).to_numpy())
    if len(unknown):
        row = int(unknown[0])
        raise UserError(
            f"{path} row {row + 2}: image id {frame[ids].iloc[row]!r} is not in train.csv"
        )
    missing = sorted(set(needed) - set(frame[ids]))
    if missing:
        raise UserError(
            f"{path}: no row for {len(missing)} training image(s): {first_few(missing)}; every "
            "training image needs its target"
        )
    values = frame[list(classes)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values).all(1) | (values < 0).any(1) | (values > 1).any(1)
    if not multilabel:
        bad |= np.abs(values.sum(1) - 1) > ROW_SUM_TOLERANCE
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        want = (
            "probabilities in [0, 1]"
            if multilabel
            else f"a distribution (values in [0, 1] summing to 1 within {ROW_SUM_TOLERANCE:g})"
        )
        shown = ", ".join(f"{c}={v!r}" for c, v in zip(classes, frame[list(classes)].iloc[row]))
        raise UserError(
            f"{path} row {row + 2} ({frame[ids].iloc[row]}): expected {want}, got {shown}"
        )
    return pd.DataFrame(values, index=frame[ids].to_numpy(), columns=list(classes))


def digest(targets: pd.DataFrame, ids: Sequence[str]) -> str:
    """A digest of the targets of `ids` as trained on (ids and float64 values, in `ids` order)."""
    hasher = hashlib.sha256("\n".join(ids).encode())
    hasher.update(np.ascontiguousarray(targets.loc[list(ids)].to_numpy(np.float64)).tobytes())
    return hasher.hexdigest()[:16]


def blend(oof: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Self-distillation targets: `alpha * oof + (1 - alpha) * label`, row by row."""
    return alpha * oof + (1 - alpha) * labels
