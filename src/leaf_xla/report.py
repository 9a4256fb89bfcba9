"""PNG plots of a run and of an ensemble (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve  # noqa: E402

from leaf_xla.files import atomic_path  # noqa: E402
from leaf_xla.rundir import HISTORY, OOF, PLOTS

if TYPE_CHECKING:
    from leaf_xla.schedule import Schedule


def _figure(width: float, height: float) -> tuple[plt.Figure, plt.Axes]:
    """One plot, laid out by matplotlib's constrained layout: titles, tick labels and the
    legend beside the axes (see `_legend`) all fit on the canvas."""
    return plt.subplots(figsize=(width, height), layout="constrained")


def _legend(fig: plt.Figure) -> None:
    """The legend right of the axes, never over a curve."""
    fig.legend(loc="outside right upper", fontsize=8)


def _epoch_axis(ax: plt.Axes) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 1, 2, not 1.5


def _save(fig: plt.Figure, path: Path) -> None:
    """Every plot is saved here: written to a temporary name and renamed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)


def lr_plot(schedule: Schedule, epochs: int, path: Path, steps_per_epoch: int = 20) -> None:
    """The learning rate over the epochs, as the optimizer sees it (every update)."""
    xs = [i / steps_per_epoch for i in range(epochs * steps_per_epoch + 1)]
    fig, ax = _figure(7, 3.5)
    ax.plot(xs, [schedule(x) for x in xs])
    _epoch_axis(ax)
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
    fig, ax = _figure(7, 4.8)
    for k, name in enumerate(classes):
        if 0 < targets[:, k].sum() < len(targets):
            fpr, tpr, _ = roc_curve(targets[:, k], probs[:, k])
            auc = roc_auc_score(targets[:, k], probs[:, k])
            ax.plot(fpr, tpr, label=f"{_wrap(name)} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    _legend(fig)
    _save(fig, path)


def _wrap(name: str) -> str:
    """A long class name (Cassava's) on lines of a tick label's width."""
    return textwrap.fill(name, 20)


def confusion_plot(
    targets: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path
) -> None:
    matrix = confusion_matrix(targets.argmax(1), probs.argmax(1), labels=range(len(classes)))
    fig, ax = _figure(6, 6)
    ax.imshow(matrix, cmap="Greens")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"  # readable on dark cells
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    names = [_wrap(name) for name in classes]
    ax.set_xticks(range(len(classes)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), names, fontsize=8)
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
    out = run_dir / PLOTS
    history = pd.read_csv(run_dir / HISTORY)
    fig, ax = _figure(7, 4)
    ax.plot(history["epoch"], history["train_loss"], "o-", label="train")
    ax.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    _epoch_axis(ax)
    ax.set_ylabel("loss")
    _legend(fig)
    _save(fig, out / "loss.png")

    fig, ax = _figure(8, 4)
    ax.plot(history["epoch"], history["val_auc"], "o-", linewidth=2, label="mean")
    for name in classes:
        if f"auc_{name}" in history:
            ax.plot(history["epoch"], history[f"auc_{name}"], "--", label=_wrap(name))
    _epoch_axis(ax)
    ax.set_ylabel("validation ROC AUC")
    _legend(fig)
    _save(fig, out / "auc.png")

    lr_plot(schedule, epochs, out / "lr.png")
    if not (run_dir / OOF).is_file():
        return  # no epoch scored an AUC (a validation set of one class): no best epoch to plot
    oof = pd.read_csv(run_dir / OOF)
    probs = oof[list(classes)].to_numpy()
    roc_plot(val_targets, probs, classes, out / "roc.png")
    if not multilabel:
        confusion_plot(val_targets, probs, classes, out / "confusion.png")
