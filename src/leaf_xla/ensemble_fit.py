"""Ensemble weights: how prediction stacks are combined, and weights fitted on out-of-fold rows.

`fit_weights` searches non-negative weights that sum to 1 for the best score of the metric (mean
column-wise ROC AUC unless told; a coarse grid, then Nelder-Mead), across folds of the OOF rows,
and keeps them only when they beat equal weights on the rows they were not fitted on. A metric
with a decision threshold (F1) is fitted at one threshold, the best for equal weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata
from sklearn.model_selection import KFold

from leaf_xla.errors import SettingError
from leaf_xla.metrics import METRICS, Metric, best_threshold

Scorer = Callable[[np.ndarray, np.ndarray], float]  # (targets, combined) -> higher is better

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


def scorer(metric: Metric, stack: np.ndarray, targets: np.ndarray, method: str) -> Scorer:
    """The metric as the weight search calls it: AUC from ranks, a thresholded metric at the
    threshold that suits equal weights on all rows."""
    if metric.name == "auc":
        return fast_mean_auc
    equal = combine(stack, np.full(len(stack), 1 / len(stack)), method)
    threshold = best_threshold(metric, targets, equal)
    return lambda t, scores: metric.score(t, scores, threshold)


def _fit_once(values: np.ndarray, targets: np.ndarray, score: Scorer) -> np.ndarray:
    """Weights on the simplex maximising `score` of already transformed `values`: a coarse
    grid (when it is small enough), then Nelder-Mead from the best point."""
    models = values.shape[0]
    best_w = np.full(models, 1 / models)
    best = score(targets, np.tensordot(best_w, values, axes=1))
    for ticks in (10, 5, 4, 3, 2):
        if math.comb(ticks + models - 1, models - 1) <= GRID_POINTS:
            for w in _simplex(models, ticks):
                value = score(targets, np.tensordot(w, values, axes=1))
                if value > best + 1e-12:
                    best_w, best = w, value
            break

    def loss(z: np.ndarray) -> float:
        w = np.abs(z) / max(np.abs(z).sum(), 1e-12)
        return -score(targets, np.tensordot(w, values, axes=1))

    result = minimize(
        loss, best_w, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-6, "maxiter": 200}
    )
    if -result.fun > best and np.abs(result.x).sum() > 0:
        best_w = np.abs(result.x) / np.abs(result.x).sum()
    return best_w


def fit_weights(
    stack: np.ndarray,
    targets: np.ndarray,
    method: str = "mean",
    n_splits: int = 5,
    seed: int = 0,
    metric: Metric = METRICS["auc"],
) -> tuple[np.ndarray, dict]:
    """Weights fitted on each K-1 parts of the OOF rows and scored on the part left out.

    The candidate is the mean of the per-split weights (steadier than one fit on all rows). It is
    kept only if its splits beat equal weights on their held-out rows; otherwise the fit is
    judged overfitted and equal weights are returned. The dict holds the held-out scores.
    """
    if len(targets) < 2 * n_splits:
        raise SettingError(
            "fit_weights", f"needs at least {2 * n_splits} OOF rows to fit on, got {len(targets)}"
        )
    values = transform(stack, method)
    score = scorer(metric, stack, targets, method)
    equal = np.full(stack.shape[0], 1 / stack.shape[0])
    splits = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fitted, held_fit, held_equal = [], [], []
    for train, test in splits.split(targets):
        w = _fit_once(values[:, train], targets[train], score)
        fitted.append(w)
        held_fit.append(score(targets[test], np.tensordot(w, values[:, test], axes=1)))
        held_equal.append(score(targets[test], np.tensordot(equal, values[:, test], axes=1)))
    weights = np.mean(fitted, axis=0)
    fit_score, equal_score = float(np.nanmean(held_fit)), float(np.nanmean(held_equal))
    kept = fit_score >= equal_score
    return (weights / weights.sum() if kept else equal), {
        "metric": metric.name,
        "heldout_score_fitted": fit_score,
        "heldout_score_equal": equal_score,
        "splits": len(fitted),
        "kept": "fitted" if kept else "equal",
    }
