"""The PNG plots a run and an ensemble write: nothing cut off at the figure's edge, legends
beside the curves rather than over them, whole-number epoch ticks, each ROC curve's AUC."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from leaf_xla import report
from leaf_xla.schedule import Schedule
from leaf_xla.synth import CASSAVA_CLASSES, PP2020_CLASSES


def _figures(monkeypatch, run_dir: Path, classes, multilabel: bool) -> dict[str, Figure]:
    """training_plots on a made-up 4-epoch run; the figures it saved, by file name."""
    rng = np.random.default_rng(0)
    n = 40
    labels = rng.integers(0, len(classes), n)
    targets = np.eye(len(classes))[labels]
    probs = targets * 0.3 + rng.random((n, len(classes))) * 0.7
    history = pd.DataFrame(
        {
            "epoch": range(4),
            "train_loss": [1.2, 0.9, 0.7, 0.6],
            "val_loss": [1.1, 0.95, 0.8, 0.75],
            "val_auc": [0.6, 0.7, 0.75, 0.8],
            **{f"auc_{c}": [0.55, 0.65, 0.7, 0.8] for c in classes},
        }
    )
    run_dir.mkdir()
    history.to_csv(run_dir / "history.csv", index=False)
    oof = pd.DataFrame(probs, columns=list(classes))
    oof.insert(0, "image_id", [f"i{k}" for k in range(n)])
    oof.to_csv(run_dir / "oof.csv", index=False)
    saved = {}
    real_save = report._save

    def keep(fig, path):
        real_save(fig, path)
        saved[path.name] = fig

    monkeypatch.setattr(report, "_save", keep)
    schedule = Schedule(1e-3, 4e-3, 3e-4, ramp_epochs=1, sustain_epochs=0, decay=0.6)
    report.training_plots(run_dir, classes, multilabel, schedule, 4, targets)
    return saved


def _inside(inner, outer, slack: float = 1.0) -> bool:
    return (
        inner.x0 >= outer.x0 - slack
        and inner.y0 >= outer.y0 - slack
        and inner.x1 <= outer.x1 + slack
        and inner.y1 <= outer.y1 + slack
    )


@pytest.mark.parametrize(
    "classes, multilabel", [(PP2020_CLASSES, True), (CASSAVA_CLASSES, False)], ids=["pp", "cassava"]
)
def test_plots_are_whole_and_readable(monkeypatch, tmp_path, classes, multilabel):
    figures = _figures(monkeypatch, tmp_path / "run", list(classes), multilabel)
    expected = {"loss.png", "auc.png", "lr.png", "roc.png"} | (
        set() if multilabel else {"confusion.png"}
    )
    assert set(figures) == expected
    for name, fig in figures.items():
        canvas = FigureCanvasAgg(fig)  # pyplot closed it: draw it again as saved
        canvas.draw()
        renderer = canvas.get_renderer()
        # Everything drawn (titles, tick labels, legends) lies on the canvas.
        drawn = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
        assert _inside(drawn, fig.bbox), (name, drawn, fig.bbox)
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), (name, "legend")
    for name in ("loss.png", "auc.png", "lr.png"):
        ax = figures[name].axes[0]
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
    roc = figures["roc.png"]
    labels = [t.get_text() for legend in roc.legends for t in legend.get_texts()]
    assert len(labels) == len(classes), labels
    assert all(re.search(r"\(AUC [01]\.\d{3}\)$", label) for label in labels), labels
