"""Average per-model prediction CSVs into a checked Kaggle submission.

    python -m leaf_xla.ensemble b7.csv b6.csv resnet.csv irv2.csv --weights 0.35 0.3 0.15 0.2 \\
        --data-dir data/plant-pathology-2020-fgvc7 --out submission.csv

The seed's weighted average, aligned by image_id; weights from `--weights`, from an ensemble
config's `models:` (`--config`, matched by model name, else by position) or equal.
`--fit-weights OOF ...` (one out-of-fold set per model: a file, a glob such as
'runs/b7-fold*/oof.csv' or comma-separated files) instead chooses non-negative weights that
maximise the mean column-wise ROC AUC on the out-of-fold predictions. They are fitted across
folds of the OOF rows, and kept only if they beat equal weights on the rows they were not fitted
on. `--oof OOF ...` scores given weights the same way without fitting them. `--method rank`
averages per-class ranks instead of probabilities.
Writes the submission (checked against sample_submission.csv when --data-dir has one), a JSON
report beside it (weights, per-model and ensemble OOF AUC, per class) and, with OOF predictions,
<report>_roc.png: the ensemble's per-class ROC curves.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.stats import rankdata
from sklearn.model_selection import KFold

from leaf_xla.cli import UserError
from leaf_xla.config import find_config, load_yaml
from leaf_xla.data import ID_COLUMNS, read_dataset
from leaf_xla.files import atomic_to_csv, atomic_write_text
from leaf_xla.metrics import column_auc, mean_auc

SHOWN = 3  # offending ids named in an error
GRID_POINTS = 2000  # most weight combinations the coarse search tries before Nelder-Mead


def _first(values: Sequence[str]) -> str:
    shown = ", ".join(map(str, values[:SHOWN]))
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")


def read_predictions(path: Path, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """A prediction CSV indexed by image_id, checked: ids present and unique, the class columns
    (reordered to `classes`), finite numbers."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_column is None:
        raise UserError(f"{path}: no image_id column")
    if frame.empty:
        raise UserError(f"{path}: no prediction rows")
    blank = np.flatnonzero(frame[id_column].isna().to_numpy())
    if len(blank):
        raise UserError(f"{path}: empty image_id on line(s) {_first((blank + 2).tolist())}")
    frame = frame.rename(columns={id_column: "image_id"}).set_index("image_id")
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
        raise UserError(f"--fit-weights: {len(targets)} OOF rows are too few to fit weights on")
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


def format_submission(
    probs: pd.DataFrame, sample: pd.DataFrame | None, path: Path | None, threshold: float = 0.5
) -> pd.DataFrame:
    """The submission in sample_submission.csv's shape (its ids, order and columns):
    probabilities, space-separated labels (multi-label) or a class number (integer)."""
    if sample is None:
        return probs.reset_index()
    id_column = next((c for c in ID_COLUMNS if c in sample.columns), None)
    if id_column is None:
        raise UserError(f"{path}: no id column (expected one of {', '.join(ID_COLUMNS)})")
    sample_ids = sample[id_column].astype(str)
    duplicated = sample_ids[sample_ids.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(f"{path}: duplicate ids {_first(duplicated)}")
    missing = sample_ids[~sample_ids.isin(probs.index)].tolist()
    extra = probs.index.difference(pd.Index(sample_ids), sort=False).tolist()
    if missing or extra:
        what = f"lack ids {_first(missing)}" if missing else f"have ids not in it: {_first(extra)}"
        raise UserError(
            f"the predictions do not match {path}: they {what} "
            f"({len(missing)} missing, {len(extra)} extra); predict the test split again"
        )
    probs = probs.loc[sample_ids]
    classes = list(probs.columns)
    other = [c for c in sample.columns if c != id_column]
    if sorted(other) == sorted(classes):
        out = probs[other].reset_index(drop=True)
    elif other == ["labels"]:  # multi-label: names above the threshold, at least the top one
        names = np.array(classes)
        chosen = [names[(row >= threshold) | (row == row.max())] for row in probs.to_numpy()]
        out = pd.DataFrame({"labels": [" ".join(c) for c in chosen]})
    elif other == ["label"]:
        out = pd.DataFrame({"label": probs.to_numpy().argmax(1)})
    else:
        raise UserError(
            f"{path}: columns {other} are neither the classes {classes} nor 'labels' / 'label'"
        )
    out.insert(0, id_column, sample_ids.to_numpy())
    return out


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


def score_oof(
    oof: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    method: str,
    names: Sequence[str],
    classes: Sequence[str],
) -> dict:
    """Per-model and ensemble mean and per-class ROC AUC on the out-of-fold rows."""

    def scores(probs: np.ndarray) -> dict:
        # null, not NaN, in the JSON for a class without positives (or negatives) in the rows
        per_class = [None if np.isnan(a) else float(a) for a in column_auc(targets, probs)]
        return {"auc": mean_auc(targets, probs), "per_class": dict(zip(classes, per_class))}

    equal = np.full(len(oof), 1 / len(oof))
    return {
        "rows": len(targets),
        "per_model": {n: scores(m) for n, m in zip(names, oof)},
        "ensemble": scores(combine(oof, weights, method)),
        "equal_weights_auc": mean_auc(targets, combine(oof, equal, method)),
    }


def print_scores(oof_report: dict, classes: Sequence[str]) -> None:
    rows = {**oof_report["per_model"], "ensemble": oof_report["ensemble"]}
    width = max(map(len, rows))
    header = "  ".join(f"{c:>{max(6, len(c))}}" for c in ["mean", *classes])
    print(f"OOF ROC AUC ({oof_report['rows']} rows)\n  {'':<{width}}  {header}")
    for name, s in rows.items():
        values = [np.nan if v is None else v for v in [s["auc"], *s["per_class"].values()]]
        cells = "  ".join(f"{v:>{max(6, len(c))}.4f}" for c, v in zip(["mean", *classes], values))
        print(f"  {name:<{width}}  {cells}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        default=0.5,
        help="multi-label submissions: probability for a label",
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
    if not 0 < args.threshold < 1:
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
    if args.method == "rank" and sample is not None and {"label", "labels"} & set(sample.columns):
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
        oof = np.stack([f.to_numpy(float) for f in oof_frames])

    if args.fit_weights:
        weights, cv = fit_weights(oof, targets, args.method)
        report["fit"] = cv
        source = "fitted" if cv["kept"] == "fitted" else "equal: fitted weights overfit"
        print(
            f"held-out OOF AUC {cv['heldout_auc_fitted']:.4f} fitted vs "
            f"{cv['heldout_auc_equal']:.4f} equal weights ({cv['splits']} splits)"
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
    if oof_patterns:
        report["oof"] = score_oof(oof, targets, weights, args.method, names, classes)
        print_scores(report["oof"], classes)
        print(f"equal weights: OOF AUC {report['oof']['equal_weights_auc']:.4f}")
    print(f"weights ({source}): " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))

    probs = pd.DataFrame(
        combine(stack, weights, args.method), index=frames[0].index, columns=classes
    )
    sample_path = args.data_dir / "sample_submission.csv" if args.data_dir else None
    submission = format_submission(probs, sample, sample_path, args.threshold)
    atomic_to_csv(submission, args.out)
    report["submission"] = str(args.out)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    written = [str(args.out), str(report_path)]
    if oof_patterns:
        from leaf_xla.report import roc_plot

        roc_path = report_path.with_name(f"{report_path.stem}_roc.png")
        roc_plot(
            targets, combine(oof, weights, args.method), classes, roc_path, "ensemble, out-of-fold"
        )
        written.append(str(roc_path))
    print(f"wrote {', '.join(written)} ({len(submission)} rows)")


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
