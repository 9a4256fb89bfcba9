"""Ensemble weights: how prediction stacks are combined, and weights fitted on out-of-fold rows.

`fit_weights` searches non-negative weights that sum to 1 for the best mean column-wise ROC AUC
(a coarse grid, then Nelder-Mead), across folds of the OOF rows, and keeps them only when they
beat equal weights on the rows they were not fitted on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata
from sklearn.model_selection import KFold

from leaf_xla.cli import SettingError

GRID_POINTS = 2000  # most weight combinations the coarse search tries before Nelder-Mead


def transform(stack: np.ndarray, method: str) -> np.ndarray:
    """(models, rows, classes) -> what is averaged: probabilities, or ranks scaled to (0, 1]."""
    if method == "rank":
        return rankdata(stack, axis=1) / stack.shape[1]
    return stack


def combine(stack: np.ndarray, weights: np.ndarray, method: str) -> np.ndarray:
    """stack: (models, rows, classes) -> (rows, classes)."""
    return np.tensordot(weights, transform(stack, method), axes=1)


def fast_mean_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """metrics.mean_auc from ranks (the Mann-Whitney statistic), for the thousands of calls of a
    weight search: the same value as scikit-learn's, ties included, without its per-call checks."""
    positives = targets.sum(0)
    negatives = len(targets) - positives
    defined = (positives > 0) & (negatives > 0)
    if not defined.any():
        return float("nan")
    ranks = rankdata(scores[:, defined], axis=0)
    pos, neg = positives[defined], negatives[defined]
    aucs = ((ranks * targets[:, defined]).sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    return float(aucs.mean())


def _simplex(models: int, ticks: int) -> Iterator[np.ndarray]:
    """Every weight vector with entries in multiples of 1/ticks that sums to 1."""
    for combo in itertools.product(range(ticks + 1), repeat=models - 1):
        if sum(combo) <= ticks:
            yield np.array([*combo, ticks - sum(combo)]) / ticks


def _fit_once(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Weights on the simplex maximising mean AUC of already transformed `values`: a coarse
    grid (when it is small enough), then Nelder-Mead from the best point."""
    models = values.shape[0]
    best_w = np.full(models, 1 / models)
    best = fast_mean_auc(targets, np.tensordot(best_w, values, axes=1))
    for ticks in (10, 5, 4, 3, 2):
        if math.comb(ticks + models - 1, models - 1) <= GRID_POINTS:
            for w in _simplex(models, ticks):
                score = fast_mean_auc(targets, np.tensordot(w, values, axes=1))
                if score > best + 1e-12:
                    best_w, best = w, score
            break

    def loss(z: np.ndarray) -> float:
        w = np.abs(z) / max(np.abs(z).sum(), 1e-12)
        return -fast_mean_auc(targets, np.tensordot(w, values, axes=1))

    result = minimize(
        loss, best_w, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-6, "maxiter": 200}
    )
    if -result.fun > best and np.abs(result.x).sum() > 0:
        best_w = np.abs(result.x) / np.abs(result.x).sum()
    return best_w


def fit_weights(
    stack: np.ndarray, targets: np.ndarray, method: str = "mean", n_splits: int = 5, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Weights fitted on each K-1 parts of the OOF rows and scored on the part left out.

    The candidate is the mean of the per-split weights (steadier than one fit on all rows). It is
    kept only if its splits beat equal weights on their held-out rows; otherwise the fit is
    judged overfitted and equal weights are returned. The dict holds the held-out AUCs.
    """
    if len(targets) < 2 * n_splits:
        raise SettingError(
            "fit_weights", f"needs at least {2 * n_splits} OOF rows to fit on, got {len(targets)}"
        )
    values = transform(stack, method)
    equal = np.full(stack.shape[0], 1 / stack.shape[0])
    splits = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fitted, held_fit, held_equal = [], [], []
    for train, test in splits.split(targets):
        w = _fit_once(values[:, train], targets[train])
        fitted.append(w)
        held_fit.append(fast_mean_auc(targets[test], np.tensordot(w, values[:, test], axes=1)))
        held_equal.append(
            fast_mean_auc(targets[test], np.tensordot(equal, values[:, test], axes=1))
        )
    weights = np.mean(fitted, axis=0)
    fit_auc, equal_auc = float(np.nanmean(held_fit)), float(np.nanmean(held_equal))
    kept = fit_auc >= equal_auc
    return (weights / weights.sum() if kept else equal), {
        "heldout_auc_fitted": fit_auc,
        "heldout_auc_equal": equal_auc,
        "splits": len(fitted),
        "kept": "fitted" if kept else "equal",
    }
