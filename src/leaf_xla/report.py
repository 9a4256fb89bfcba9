"""PNG plots of a run and of an ensemble (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from leaf_xla.files import atomic_path  # noqa: E402

if TYPE_CHECKING:
    from leaf_xla.schedule import Schedule


def _save(fig: plt.Figure, path: Path) -> None:
    """Every plot is saved here: laid out, written to a temporary name and renamed."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)


def lr_plot(schedule: Schedule, epochs: int, path: Path, steps_per_epoch: int = 20) -> None:
    """The learning rate over the epochs, as the optimizer sees it (every update)."""
    xs = [i / steps_per_epoch for i in range(epochs * steps_per_epoch + 1)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [schedule(x) for x in xs])
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("warm-up, sustain, exponential decay")
    ax.grid(alpha=0.3)
    _save(fig, path)


def roc_plot(
    targets: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: Path,
    title: str = "ROC per class",
) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(classes):
        if 0 < targets[:, k].sum() < len(targets):
            fpr, tpr, _ = roc_curve(targets[:, k], probs[:, k])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def confusion_plot(
    targets: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path
) -> None:
    matrix = confusion_matrix(targets.argmax(1), probs.argmax(1), labels=range(len(classes)))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(matrix, cmap="Greens")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (validation, best epoch)")
    _save(fig, path)


def training_plots(
    run_dir: Path,
    classes: Sequence[str],
    multilabel: bool,
    schedule: Schedule,
    epochs: int,
    val_targets: np.ndarray,
) -> None:
    """loss.png, auc.png, lr.png, roc.png and (single-label) confusion.png in <run>/plots."""
    out = run_dir / "plots"
    history = pd.read_csv(run_dir / "history.csv")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["train_loss"], "o-", label="train")
    ax.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    _save(fig, out / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["val_auc"], "o-", linewidth=2, label="mean")
    for name in classes:
        if f"auc_{name}" in history:
            ax.plot(history["epoch"], history[f"auc_{name}"], "--", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ROC AUC")
    ax.legend(fontsize=8)
    _save(fig, out / "auc.png")

    lr_plot(schedule, epochs, out / "lr.png")
    if not (run_dir / "oof.csv").is_file():
        return  # no epoch scored an AUC (a validation set of one class): no best epoch to plot
    oof = pd.read_csv(run_dir / "oof.csv")
    probs = oof[list(classes)].to_numpy()
    roc_plot(val_targets, probs, classes, out / "roc.png")
    if not multilabel:
        confusion_plot(val_targets, probs, classes, out / "confusion.png")
