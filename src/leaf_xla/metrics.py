"""The competition metric: mean column-wise ROC AUC (scikit-learn), with per-class values."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def column_auc(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC per class column; NaN for a column whose targets are all 0 or all 1."""
    aucs = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        if 0 < targets[:, k].sum() < len(targets):
            aucs[k] = roc_auc_score(targets[:, k], probs[:, k])
    return aucs


def mean_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean column-wise ROC AUC over the columns where it is defined (the Kaggle score)."""
    aucs = column_auc(targets, probs)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
