"""Average per-model prediction CSVs into a checked Kaggle submission.

    python -m leaf_xla.ensemble b7.csv b6.csv resnet.csv irv2.csv --weights 0.35 0.3 0.15 0.2 \\
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

import argparse
import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla.cli import ArgumentParser, UserError
from leaf_xla.config import find_config, load_yaml
from leaf_xla.data import read_csv, read_dataset
from leaf_xla.ensemble_fit import combine, fit_weights
from leaf_xla.files import atomic_to_csv, atomic_write_text
from leaf_xla.formats import format_submission, id_column, submission_format
from leaf_xla.metrics import (
    METRIC_CHOICES,
    Metric,
    best_threshold,
    chance,
    column_auc,
    mean_auc,
    near_chance,
    resolve,
)

SHOWN = 3  # offending ids named in an error


def _first(values: Sequence[str]) -> str:
    shown = ", ".join(map(str, values[:SHOWN]))
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")


def read_predictions(path: Path, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """A prediction CSV indexed by image_id, checked: ids present and unique, the class columns
    (reordered to `classes`), finite numbers."""
    frame = read_csv(path, missing="expected a prediction CSV (predict --out)")
    ids = id_column(frame, path)
    if frame.empty:
        raise UserError(f"{path}: no prediction rows")
    blank = np.flatnonzero(frame[ids].isna().to_numpy())
    if len(blank):
        raise UserError(f"{path}: empty image_id on line(s) {_first((blank + 2).tolist())}")
    frame = frame.rename(columns={ids: "image_id"}).set_index("image_id")
    duplicated = frame.index[frame.index.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(f"{path}: duplicate image ids {_first(duplicated)}")
    if frame.columns.empty:
        raise UserError(f"{path}: no class columns after image_id")
    columns = list(classes) if classes is not None else list(frame.columns)
    if sorted(frame.columns) != sorted(columns):
        raise UserError(
            f"{path}: class columns {list(frame.columns)} differ from the first CSV's {columns}"
        )
    values = frame[columns].apply(pd.to_numeric, errors="coerce")
    bad = values.index[~np.isfinite(values.to_numpy(float)).all(axis=1)].tolist()
    if bad:
        raise UserError(f"{path}: non-finite or non-numeric values for ids {_first(bad)}")
    return values.astype(float)


def align(frames: list[pd.DataFrame], paths: list[Path]) -> list[pd.DataFrame]:
    """All frames on the first one's id order; any id set mismatch is an error naming ids."""
    reference = frames[0].index
    for frame, path in zip(frames[1:], paths[1:]):
        missing = reference.difference(frame.index, sort=False).tolist()
        extra = frame.index.difference(reference, sort=False).tolist()
        if missing or extra:
            what = (
                f"lacks ids {_first(missing)} that {paths[0]} has"
                if missing
                else f"has ids not in {paths[0]}: {_first(extra)}"
            )
            raise UserError(f"{path}: {what} ({len(missing)} missing, {len(extra)} extra)")
    return [frame.loc[reference] for frame in frames]


def expand(patterns: Sequence[str]) -> list[list[Path]]:
    """One list of files per argument: a file, a glob (e.g. every fold's oof.csv) or
    comma-separated files."""
    groups = []
    for pattern in patterns:
        parts = [pattern] if Path(pattern).is_file() else pattern.split(",")
        files = []
        for part in parts:
            files += sorted(map(Path, glob.glob(part))) if glob.has_magic(part) else [Path(part)]
        if not files:
            raise UserError(f"{pattern}: no file matches")
        groups.append(files)
    return groups


def read_group(files: list[Path], classes: Sequence[str]) -> pd.DataFrame:
    """One model's predictions, concatenated over its files (e.g. its folds' OOF CSVs)."""
    frame = pd.concat([read_predictions(f, classes) for f in files])
    duplicated = frame.index[frame.index.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(
            f"{', '.join(map(str, files))}: ids {_first(duplicated)} appear in more than one file"
        )
    return frame


def _writes_probabilities(
    sample: pd.DataFrame, path: Path, classes: list[str], label_format: str | None
) -> bool:
    """Whether the submission sample_submission.csv asks for holds probabilities (not labels)."""
    return submission_format(sample, path, classes, label_format).probabilities


def config_weights(path: Path, names: list[str]) -> np.ndarray:
    """The `weight` of each model of an ensemble config: by model name when every CSV is named
    after one of its models, else by position."""
    models = load_yaml(path).get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and "name" in m for m in models):
        raise UserError(f"{path}: expected 'models:', a list of {{name, weight}} entries")
    weight_of = {}
    for model in models:
        weight = model.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise UserError(
                f"{path}: model {model['name']}: weight must be a number, got {weight!r}"
            )
        weight_of[str(model["name"])] = float(weight)
    if len(models) != len(names):
        raise UserError(f"{path}: {len(models)} models for {len(names)} prediction CSVs")
    if set(names) <= set(weight_of):
        return np.array([weight_of[n] for n in names])
    print(f"weights from {path} by position (the CSV names are not its model names)")
    return np.array(list(weight_of.values()))


def _model_names(paths: list[Path]) -> list[str]:
    """Short unique names: file stems, else parent/stem, else the paths."""
    for name in (lambda p: p.stem, lambda p: f"{p.parent.name}/{p.stem}", str):
        names = [name(p) for p in paths]
        if len(set(names)) == len(names):
            return names
    raise UserError(f"the same prediction CSV is given twice: {_first([str(p) for p in paths])}")


@dataclass
class OutOfFold:
    """The models' out-of-fold predictions and how they are scored."""

    stack: np.ndarray  # (models, rows, classes)
    targets: np.ndarray  # (rows, classes)
    metric: Metric
    method: str
    threshold: float | None  # --threshold; None: each prediction's best on these rows

    def threshold_for(self, probs: np.ndarray) -> float:
        given = self.threshold
        return best_threshold(self.metric, self.targets, probs) if given is None else given

    def score(self, probs: np.ndarray) -> float:
        return self.metric.score(self.targets, probs, self.threshold_for(probs))

    def combined(self, weights: np.ndarray, members: slice | list[int] = slice(None)) -> np.ndarray:
        return combine(self.stack[members], weights, self.method)


def score_oof(oof: OutOfFold, weights: np.ndarray, names: list[str], classes: list[str]) -> dict:
    """Per-model and ensemble score (the metric), mean and per-class ROC AUC on the
    out-of-fold rows."""

    def scores(probs: np.ndarray) -> dict:
        # null, not NaN, in the JSON for a class without positives (or negatives) in the rows
        per_class = [None if np.isnan(a) else float(a) for a in column_auc(oof.targets, probs)]
        threshold = {"threshold": oof.threshold_for(probs)} if oof.metric.thresholded else {}
        return {
            "score": oof.score(probs),
            **threshold,
            "auc": mean_auc(oof.targets, probs),
            "per_class": dict(zip(classes, per_class)),
        }

    equal = oof.combined(np.full(len(oof.stack), 1 / len(oof.stack)))
    return {
        "metric": oof.metric.name,
        "rows": len(oof.targets),
        "per_model": {n: scores(m) for n, m in zip(names, oof.stack)},
        "ensemble": scores(oof.combined(weights)),
        "equal_weights_score": oof.score(equal),
        "equal_weights_auc": mean_auc(oof.targets, equal),
    }


def print_scores(oof_report: dict, classes: Sequence[str], metric: Metric) -> None:
    rows = {**oof_report["per_model"], "ensemble": oof_report["ensemble"]}
    width = max(map(len, rows))
    first = [metric.name] if metric.name != "auc" else []
    columns = [*first, "AUC", *classes]
    header = "  ".join(f"{c:>{max(6, len(c))}}" for c in columns)
    what = metric.title if metric.name == "auc" else f"{metric.title}, and ROC AUC"
    print(f"OOF {what} ({oof_report['rows']} rows)\n  {'':<{width}}  {header}")
    for name, s in rows.items():
        values = [s["score"]] * len(first) + [s["auc"], *s["per_class"].values()]
        values = [np.nan if v is None else v for v in values]
        cells = "  ".join(f"{v:>{max(6, len(c))}.4f}" for c, v in zip(columns, values))
        print(f"  {name:<{width}}  {cells}")


def advice(oof: OutOfFold, oof_report: dict, weights: np.ndarray, fitted: bool) -> list[str]:
    """What to look at when the ensemble scores below its best member, or a member is near
    chance: the member whose removal helps most, and what --fit-weights would give."""
    metric, name = oof.metric, oof.metric.name
    members = {n: s["score"] for n, s in oof_report["per_model"].items()}
    ensemble = oof_report["ensemble"]["score"]
    best = max(members, key=members.get)
    baseline = chance(metric, oof.targets)
    weak = [n for n, score in members.items() if near_chance(metric, score, baseline)]
    below = len(members) > 1 and ensemble < members[best] - 1e-9
    if not (below or weak):
        return []
    lines = []
    if below:
        lines.append(
            f"the ensemble's out-of-fold {name} {ensemble:.4f} is below its best member's "
            f"({best} {members[best]:.4f})"
        )
    lines += [
        f"{n} is near chance: out-of-fold {name} {members[n]:.4f}, chance {baseline:.4f} (did it "
        "learn? see its history.csv)"
        for n in weak
    ]
    if len(members) < 2:
        return lines
    names = list(members)
    without = {}
    for k, n in enumerate(names):
        rest = [i for i in range(len(names)) if i != k]
        kept = weights[rest] if weights[rest].sum() > 0 else np.ones(len(rest))
        without[n] = oof.score(oof.combined(kept / kept.sum(), rest))
    drop = max(without, key=without.get)
    lines.append(
        f"without {drop} the ensemble's out-of-fold {name} is {without[drop]:.4f} "
        f"({without[drop] - ensemble:+.4f}): leave it out of the ensemble"
        if without[drop] > ensemble
        else f"leaving a member out helps no more (without {drop}: {without[drop]:.4f})"
    )
    if not fitted and len(oof.targets) >= 10:
        fit, cv = fit_weights(oof.stack, oof.targets, oof.method, metric=metric)
        shown = ", ".join(f"{n} {w:.3f}" for n, w in zip(names, fit))
        held = f"held out {cv['heldout_score_fitted']:.4f} vs {cv['heldout_score_equal']:.4f} equal"
        lines.append(
            f"--fit-weights would give {shown}: out-of-fold {name} "
            f"{oof.score(oof.combined(fit)):.4f} ({held})"
            if cv["kept"] == "fitted"
            else f"--fit-weights would keep equal weights (fitted ones overfit: {held})"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m leaf_xla.ensemble", description=__doc__.split("\n\n")[0]
    )
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
    report_path = args.report or args.out.with_suffix(".json")
    for path in (args.out, report_path):
        if path.exists() and not args.overwrite:
            raise UserError(f"{path} exists: pass --overwrite to replace it")
    if args.fit_weights and args.oof:
        raise UserError("--oof and --fit-weights both name OOF files: give one of them")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1, got {args.threshold}")
    paths = [Path(p) for p in args.predictions]
    names = _model_names(paths)
    frames = [read_predictions(paths[0])]
    classes = list(frames[0].columns)
    frames += [read_predictions(p, classes) for p in paths[1:]]
    frames = align(frames, paths)
    stack = np.stack([f.to_numpy(float) for f in frames])

    oof_patterns = args.fit_weights or args.oof
    if oof_patterns and not args.data_dir:
        raise UserError("OOF predictions need --data-dir for the training labels")
    data = (
        read_dataset(args.data_dir, classes=classes, need_train=bool(oof_patterns))
        if args.data_dir
        else None
    )
    sample = data.sample_submission if data is not None else None
    sample_path = args.data_dir / "sample_submission.csv" if args.data_dir else None
    label_format = data.label_format if data is not None else None
    if (
        args.method == "rank"
        and sample is not None
        and not _writes_probabilities(sample, sample_path, classes, label_format)
    ):
        raise UserError(
            f"--method rank gives ranks, not the probabilities that the labels of "
            f"{args.data_dir / 'sample_submission.csv'} are chosen from: use --method mean"
        )

    report: dict = {"models": names, "method": args.method}
    if oof_patterns:
        groups = expand(oof_patterns)
        if len(groups) != len(paths):
            option = "--fit-weights" if args.fit_weights else "--oof"
            raise UserError(f"{option}: {len(groups)} OOF sets for {len(paths)} prediction CSVs")
        oof_frames = align([read_group(g, classes) for g in groups], [g[0] for g in groups])
        label_of = dict(zip(data.train.ids, data.train.targets))
        unknown = [i for i in oof_frames[0].index if i not in label_of]
        if unknown:
            raise UserError(f"{groups[0][0]}: ids not in train.csv: {_first(unknown)}")
        targets = np.stack([label_of[i] for i in oof_frames[0].index])
        metric = resolve(args.metric, data.label_format, data.multilabel)
        oof = OutOfFold(
            np.stack([f.to_numpy(float) for f in oof_frames]),
            targets,
            metric,
            args.method,
            args.threshold,
        )

    if args.fit_weights:
        weights, cv = fit_weights(oof.stack, targets, args.method, metric=metric)
        report["fit"] = cv
        source = "fitted" if cv["kept"] == "fitted" else "equal: fitted weights overfit"
        print(
            f"held-out OOF {metric.name} {cv['heldout_score_fitted']:.4f} fitted vs "
            f"{cv['heldout_score_equal']:.4f} equal weights ({cv['splits']} splits)"
        )
    elif args.config:
        weights, source = config_weights(find_config(args.config), names), args.config
    elif args.weights:
        if len(args.weights) != len(paths):
            raise UserError(f"--weights: {len(args.weights)} weights for {len(paths)} CSVs")
        weights, source = np.array(args.weights), "--weights"
    else:
        weights, source = np.ones(len(paths)), "equal"
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise UserError(
            f"weights ({source}) must be non-negative, finite and not all zero, "
            f"got {weights.tolist()}"
        )
    weights = weights / weights.sum()
    report["weights"] = dict(zip(names, weights.round(6).tolist()))
    report["weights_from"] = source
    threshold = 0.5 if args.threshold is None else args.threshold
    warnings = []
    if oof_patterns:
        report["metric"] = metric.name
        report["oof"] = score_oof(oof, weights, names, classes)
        print_scores(report["oof"], classes, metric)
        print(f"equal weights: OOF {metric.name} {report['oof']['equal_weights_score']:.4f}")
        if metric.thresholded:
            threshold = oof.threshold_for(oof.combined(weights))
            chosen = "given" if args.threshold is not None else "best out-of-fold"
            print(f"decision threshold {threshold:.2f} ({chosen} {metric.title})")
        warnings = advice(oof, report["oof"], weights, fitted=bool(args.fit_weights))
        report["warnings"] = warnings
    report["threshold"] = threshold
    print(f"weights ({source}): " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))

    probs = pd.DataFrame(
        combine(stack, weights, args.method), index=frames[0].index, columns=classes
    )
    submission = format_submission(probs, sample, sample_path, threshold, label_format)
    atomic_to_csv(submission, args.out)
    report["submission"] = str(args.out)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    written = [str(args.out), str(report_path)]
    if oof_patterns:
        from leaf_xla.report import roc_plot

        roc_path = report_path.with_name(f"{report_path.stem}_roc.png")
        roc_plot(targets, oof.combined(weights), classes, roc_path, "ensemble, out-of-fold")
        written.append(str(roc_path))
    print(f"wrote {', '.join(written)} ({len(submission)} rows)")
    for line in warnings:
        print(f"warning: {line}")


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
