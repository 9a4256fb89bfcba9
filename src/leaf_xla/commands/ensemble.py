"""Average per-model prediction CSVs into a checked Kaggle submission.

    leaf-xla ensemble b7.csv b6.csv resnet.csv irv2.csv --weights 0.35 0.3 0.15 0.2 \\
        --data-dir data/plant-pathology-2020-fgvc7 --out submission.csv

The seed's weighted average, aligned by image_id; weights from `--weights`, from an ensemble
config's `models:` (`--config`, matched by model name, else by position) or equal.
`--fit-weights OOF ...` (one out-of-fold set per model: a file, a glob such as
'runs/b7-fold*/oof.csv' or comma-separated files) instead chooses non-negative weights that
maximise the competition's metric on the out-of-fold predictions (`--metric`, by default the
data's label format's: mean column-wise ROC AUC for Plant Pathology 2020, mean F1 over images
for 2021, accuracy for Cassava and generic data). They are fitted across folds of the OOF rows,
and kept only if they beat equal weights on the rows they were not fitted on. `--oof OOF ...`
scores given weights the same way without fitting them. With OOF predictions, a multi-label
submission's decision threshold is the one with the best out-of-fold F1 (unless --threshold),
and the end of the output says when the ensemble scores below its best member or a member is
near chance, which member's removal helps most, and what --fit-weights would give.
`--method rank` averages per-class ranks instead of probabilities.
Writes the submission (checked against sample_submission.csv when --data-dir has one), a JSON
report beside it (metric, weights, threshold, per-model and ensemble OOF scores and AUC, per
class) and, with OOF predictions, <report>_roc.png: the ensemble's per-class ROC curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands.options import settings_of
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.metrics import METRIC_CHOICES


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla ensemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", nargs="+", help="test prediction CSVs, one per model")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=float, nargs="+", help="one per model (normalised)")
    weights.add_argument("--config", help="ensemble YAML whose models' weights to use")
    weights.add_argument(
        "--fit-weights",
        nargs="+",
        metavar="OOF",
        help="out-of-fold CSVs (files, globs or comma-separated files), one set per model, "
        "to fit the weights on",
    )
    parser.add_argument(
        "--oof", nargs="+", metavar="OOF", help="as --fit-weights, but only to score the weights"
    )
    parser.add_argument("--method", choices=("mean", "rank"), default="mean")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="competition folder: train labels for OOF scores, "
        "sample_submission.csv to check the output against",
    )
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    parser.add_argument("--report", type=Path, help="JSON report (default: <out>.json)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="multi-label submissions: probability for a label (default: the one with the best "
        "out-of-fold score when OOF predictions are given, else 0.5)",
    )
    parser.add_argument(
        "--metric",
        choices=METRIC_CHOICES,
        default="auto",
        help="out-of-fold score, and what --fit-weights maximises; auto: the competition's, "
        "from the data's label format",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from leaf_xla.ensemble import EnsembleSettings, ensemble  # pandas, sklearn: after the args

    ensemble(settings_of(EnsembleSettings, args))
