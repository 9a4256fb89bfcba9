"""The competitions' metrics (scikit-learn), on (N, C) 0/1 targets and (N, C) probabilities.

Each label format names its competition's (formats.py, `metric`); `--metric` picks another.
- auc: mean column-wise ROC AUC (Plant Pathology 2020), with per-class values;
- accuracy: top-1 accuracy, one class per image (Cassava; generic single-label data);
- f1_samples: the F1 of each image's predicted label set, averaged over images (Plant
  Pathology 2021's "mean F1"); an image's set is every class at or above the decision
  threshold, and at least its most probable one, as the submission writes it. The threshold is
  chosen where the score is best (`best_threshold`): on a validation fold in training, on the
  out-of-fold predictions in `ensemble`, which then writes the submission with it;
- f1_macro: the F1 of each class's top-1 predictions, averaged over classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # tried by best_threshold
NEAR_CHANCE = 0.1  # a score within this share of the way from chance to perfect is near chance


def column_auc(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC per class column; NaN for a column whose targets are all 0 or all 1."""
    from sklearn.metrics import roc_auc_score  # sklearn only when scoring: fast --help

    aucs = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        if 0 < targets[:, k].sum() < len(targets):
            aucs[k] = roc_auc_score(targets[:, k], probs[:, k])
    return aucs


def mean_auc(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    """Mean column-wise ROC AUC over the columns where it is defined (the Kaggle score)."""
    aucs = column_auc(targets, probs)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def predicted_sets(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(N, C) 0/1: the classes at or above `threshold`, and at least the most probable one (the
    multi-label submission's rule, formats.MultiLabel)."""
    top = probs == probs.max(axis=1, keepdims=True)
    return ((probs >= threshold) | top).astype(np.int8)


def accuracy(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(targets.argmax(1), probs.argmax(1)))


def f1_samples(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    from sklearn.metrics import f1_score

    sets = predicted_sets(probs, threshold)
    return float(f1_score(targets.astype(np.int8), sets, average="samples", zero_division=0))


def f1_macro(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    from sklearn.metrics import f1_score

    labels = np.arange(targets.shape[1])
    return float(
        f1_score(
            targets.argmax(1), probs.argmax(1), labels=labels, average="macro", zero_division=0
        )
    )


@dataclass(frozen=True)
class Metric:
    name: str  # --metric, the history column val_<name>
    title: str  # what the tables say
    score: Callable[..., float]  # (targets, probs, threshold) -> higher is better
    thresholded: bool = False  # needs a decision threshold, chosen on held-out predictions
    single_label: bool = False  # one class per image only

    @property
    def shown(self) -> str:
        """The name in a sentence: `AUC`, `accuracy`, ..."""
        return "AUC" if self.name == "auc" else self.name


METRICS = {
    m.name: m
    for m in (
        Metric("auc", "mean column-wise ROC AUC", mean_auc),
        Metric("accuracy", "accuracy", accuracy, single_label=True),
        Metric("f1_samples", "mean F1 over images", f1_samples, thresholded=True),
        Metric("f1_macro", "macro F1 over classes", f1_macro, single_label=True),
    )
}
METRIC_CHOICES = ("auto", *METRICS)  # --metric: auto is the label format's


def resolve(name: str, label_format: str, multilabel: bool) -> Metric:
    """The metric `--metric name` means for data in `label_format`."""
    from leaf_xla import formats
    from leaf_xla.errors import UserError

    if name == "auto":
        fmt = formats.FORMATS.get(label_format)
        name = fmt.metric if fmt is not None else "auc"
    if name not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRIC_CHOICES)}, got {name!r}")
    metric = METRICS[name]
    if metric.single_label and multilabel:
        raise UserError(
            f"--metric {name} needs one class per image, and this data is multi-label: "
            "use f1_samples or auc"
        )
    return metric


def best_threshold(metric: Metric, targets: np.ndarray, probs: np.ndarray) -> float:
    """The decision threshold with the best score on these rows (0.5 for a metric without)."""
    if not metric.thresholded:
        return 0.5
    scores = [metric.score(targets, probs, t) for t in THRESHOLDS]
    return float(THRESHOLDS[int(np.nanargmax(scores))]) if np.isfinite(scores).any() else 0.5


def chance(metric: Metric, targets: np.ndarray) -> float:
    """The score of a guess without the image: every row predicted as the class frequencies."""
    priors = np.broadcast_to(targets.mean(0), targets.shape).copy()
    threshold = best_threshold(metric, targets, priors)
    return metric.score(targets, priors, threshold)


def near_chance(metric: Metric, score: float, chance_score: float) -> bool:
    return not score > chance_score + NEAR_CHANCE * (1 - chance_score)


def validation_scores(
    metric: Metric, targets: np.ndarray, probs: np.ndarray, classes: list[str], prefix: str = ""
) -> dict[str, float]:
    """history.csv's validation columns: the metric first (val_<name>, with the threshold it
    was scored at when it needs one), the mean AUC (val_auc) and each class's AUC."""
    aucs = column_auc(targets, probs)
    auc = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else math.nan
    scores = {}
    if metric.name != "auc":
        threshold = best_threshold(metric, targets, probs)
        scores[f"{prefix}val_{metric.name}"] = metric.score(targets, probs, threshold)
        if metric.thresholded:
            scores[f"{prefix}threshold"] = threshold
    scores[f"{prefix}val_auc"] = auc
    if not prefix:
        scores.update({f"auc_{c}": float(a) for c, a in zip(classes, aucs)})
    return scores
