"""Average per-model prediction CSVs into a checked Kaggle submission.

    python -m leaf_xla.ensemble b7.csv b6.csv resnet.csv irv2.csv --weights 0.35 0.3 0.15 0.2 \\
        --data-dir data/plant-pathology-2020-fgvc7 --out submission.csv

The seed's weighted average, aligned by image_id. `--fit-weights OOF ...` (one out-of-fold CSV
per model, glob patterns allowed, e.g. 'runs/b7-fold*/oof.csv') instead chooses non-negative
weights that maximise the mean column-wise ROC AUC on the out-of-fold predictions, fitted
across folds of the OOF rows so that the weights are judged on rows they were not fitted on.
`--method rank` averages per-class ranks instead of probabilities.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
from collections.abc import Sequence
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

SHOWN = 3


def read_predictions(path: Path, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """A prediction CSV indexed by image_id, checked: ids unique, class columns, finite values."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_column is None:
        raise UserError(f"{path}: no image_id column")
    frame = frame.rename(columns={id_column: "image_id"}).set_index("image_id")
    duplicated = frame.index[frame.index.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(f"{path}: duplicate image ids {', '.join(duplicated[:SHOWN])}")
    columns = list(classes) if classes is not None else list(frame.columns)
    if list(frame.columns) != columns:
        raise UserError(f"{path}: class columns {list(frame.columns)} differ from {columns}")
    values = frame.apply(pd.to_numeric, errors="coerce")
    bad = values.index[~np.isfinite(values.to_numpy(float)).all(axis=1)].tolist()
    if bad:
        raise UserError(
            f"{path}: non-finite or non-numeric values for ids {', '.join(bad[:SHOWN])}"
        )
    return values


def align(frames: list[pd.DataFrame], paths: list[Path]) -> list[pd.DataFrame]:
    """All frames on the first one's id order; any id set mismatch is an error naming ids."""
    reference = frames[0].index
    for frame, path in zip(frames[1:], paths[1:]):
        missing = reference.difference(frame.index).tolist()
        extra = frame.index.difference(reference).tolist()
        if missing or extra:
            what = (
                f"lacks ids {', '.join(missing[:SHOWN])}"
                if missing
                else f"has ids not in {paths[0]}: {', '.join(extra[:SHOWN])}"
            )
            raise UserError(f"{path}: {what} ({len(missing)} missing, {len(extra)} extra)")
    return [frame.loc[reference] for frame in frames]


def combine(stack: np.ndarray, weights: np.ndarray, method: str) -> np.ndarray:
    """stack: (models, rows, classes) -> (rows, classes)."""
    if method == "rank":
        stack = np.stack([np.apply_along_axis(rankdata, 0, m) / m.shape[0] for m in stack])
    return np.tensordot(weights, stack, axes=1)


def _fit_once(stack: np.ndarray, targets: np.ndarray, method: str) -> np.ndarray:
    """Weights on the simplex maximising mean AUC: a coarse grid, then Nelder-Mead."""
    models = stack.shape[0]
    step = 0.1 if models <= 4 else 0.25
    ticks = int(round(1 / step))
    best_w, best = np.full(models, 1 / models), -np.inf
    for combo in itertools.product(range(ticks + 1), repeat=models - 1):
        if sum(combo) <= ticks:
            w = np.array([*combo, ticks - sum(combo)]) / ticks
            score = mean_auc(targets, combine(stack, w, method))
            if score > best + 1e-12:
                best_w, best = w, score

    def loss(z: np.ndarray) -> float:
        w = np.abs(z) / max(np.abs(z).sum(), 1e-12)
        return -mean_auc(targets, combine(stack, w, method))

    result = minimize(
        loss, best_w, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-6, "maxiter": 200}
    )
    if -result.fun > best:
        best_w = np.abs(result.x) / np.abs(result.x).sum()
    return best_w


def fit_weights(
    stack: np.ndarray, targets: np.ndarray, method: str = "mean", n_splits: int = 5, seed: int = 0
) -> tuple[np.ndarray, dict]:
    """Weights fitted on each K-1 parts of the OOF rows and scored on the part left out.

    The returned weights are the mean of the per-split weights (steadier than one fit on all
    rows); the report holds the held-out AUC of fitted versus equal weights.
    """
    equal = np.full(stack.shape[0], 1 / stack.shape[0])
    splits = KFold(n_splits=min(n_splits, len(targets)), shuffle=True, random_state=seed)
    fitted, held_fit, held_equal = [], [], []
    for train, test in splits.split(targets):
        w = _fit_once(stack[:, train], targets[train], method)
        fitted.append(w)
        held_fit.append(mean_auc(targets[test], combine(stack[:, test], w, method)))
        held_equal.append(mean_auc(targets[test], combine(stack[:, test], equal, method)))
    weights = np.mean(fitted, axis=0)
    return weights / weights.sum(), {
        "heldout_auc_fitted": float(np.nanmean(held_fit)),
        "heldout_auc_equal": float(np.nanmean(held_equal)),
        "splits": len(fitted),
    }


def expand(patterns: Sequence[str]) -> list[list[Path]]:
    """One list of files per argument; an argument may be a glob (e.g. every fold's oof.csv)."""
    groups = []
    for pattern in patterns:
        files = (
            sorted(Path(p) for p in glob.glob(pattern))
            if glob.has_magic(pattern)
            else [Path(pattern)]
        )
        if not files:
            raise UserError(f"{pattern}: no file matches")
        groups.append(files)
    return groups


def read_group(files: list[Path], classes: Sequence[str] | None) -> pd.DataFrame:
    """One model's predictions, concatenated over its files (e.g. its folds' OOF CSVs)."""
    frames = [read_predictions(f, classes) for f in files]
    frame = pd.concat(frames)
    duplicated = frame.index[frame.index.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(
            f"{files[0].parent}: ids {', '.join(duplicated[:SHOWN])} appear in "
            "more than one of its files"
        )
    return frame


def format_submission(
    probs: pd.DataFrame, sample: pd.DataFrame | None, path: Path, threshold: float
) -> pd.DataFrame:
    """The submission in sample_submission.csv's shape: probabilities, labels or a class id."""
    if sample is None:
        return probs.reset_index()
    id_column = next(c for c in ID_COLUMNS if c in sample.columns)
    sample_ids = sample[id_column].astype(str)
    missing = sample_ids[~sample_ids.isin(probs.index)].tolist()
    extra = probs.index.difference(sample_ids).tolist()
    if missing or extra:
        ids = ", ".join((missing or extra)[:SHOWN])
        raise UserError(
            f"predictions do not match {path}: {'missing' if missing else 'unexpected'} ids {ids}"
        )
    probs = probs.loc[sample_ids]
    classes = list(probs.columns)
    other = [c for c in sample.columns if c != id_column]
    if other == classes:
        out = probs.reset_index(drop=True)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m leaf_xla.ensemble", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("predictions", nargs="+", help="test prediction CSVs, one per model")
    parser.add_argument("--weights", type=float, nargs="+", help="one per model (normalised)")
    parser.add_argument("--config", help="ensemble YAML whose models' weights to use")
    parser.add_argument(
        "--fit-weights",
        nargs="+",
        metavar="OOF",
        help="out-of-fold CSVs (or globs), one per model, to fit the weights on",
    )
    parser.add_argument("--method", choices=("mean", "rank"), default="mean")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="competition folder: train labels for --fit-weights, "
        "sample_submission.csv to check the output against",
    )
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    parser.add_argument("--report", type=Path, help="JSON report (default: beside --out)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="multi-label submissions: probability for a label",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _names(groups: list[list[Path]]) -> list[str]:
    return [
        files[0].parent.name if files[0].stem in ("oof", "test") else files[0].stem
        for files in groups
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists: pass --overwrite to replace it")
    paths = [Path(p) for p in args.predictions]
    frames = [read_predictions(paths[0])]
    classes = list(frames[0].columns)
    frames += [read_predictions(p, classes) for p in paths[1:]]
    frames = align(frames, paths)
    stack = np.stack([f.to_numpy(float) for f in frames])
    names = [p.stem for p in paths]

    data = (
        read_dataset(args.data_dir, classes=classes, need_train=bool(args.fit_weights))
        if args.data_dir
        else None
    )
    report: dict = {"models": names, "method": args.method}
    if args.fit_weights:
        if args.weights or args.config:
            raise UserError("--fit-weights chooses the weights: drop --weights / --config")
        if data is None:
            raise UserError("--fit-weights needs --data-dir for the training labels")
        groups = expand(args.fit_weights)
        if len(groups) != len(paths):
            raise UserError(f"--fit-weights: {len(groups)} OOF sets for {len(paths)} models")
        oof_frames = align([read_group(g, classes) for g in groups], [g[0] for g in groups])
        label_of = dict(zip(data.train.ids, data.train.targets))
        unknown = [i for i in oof_frames[0].index if i not in label_of]
        if unknown:
            raise UserError(f"{groups[0][0]}: ids not in train.csv: {', '.join(unknown[:SHOWN])}")
        targets = np.stack([label_of[i] for i in oof_frames[0].index])
        oof = np.stack([f.to_numpy(float) for f in oof_frames])
        weights, cv = fit_weights(oof, targets, args.method)
        ensemble_oof = combine(oof, weights, args.method)
        report["oof"] = {
            "rows": len(targets),
            "per_model": {
                n: {
                    "auc": mean_auc(targets, m),
                    "per_class": dict(zip(classes, column_auc(targets, m).tolist())),
                }
                for n, m in zip(_names(groups), oof)
            },
            "ensemble": {
                "auc": mean_auc(targets, ensemble_oof),
                "per_class": dict(zip(classes, column_auc(targets, ensemble_oof).tolist())),
            },
            "equal_weights_auc": mean_auc(
                targets, combine(oof, np.full(len(oof), 1 / len(oof)), args.method)
            ),
            **cv,
        }
        for name, model in report["oof"]["per_model"].items():
            print(f"OOF AUC {model['auc']:.4f}  {name}")
        print(
            f"OOF AUC {report['oof']['ensemble']['auc']:.4f}  ensemble (fitted weights); "
            f"held-out {cv['heldout_auc_fitted']:.4f} fitted vs "
            f"{cv['heldout_auc_equal']:.4f} equal"
        )
    elif args.config:
        models = load_yaml(find_config(args.config)).get("models", [])
        weights = np.array([float(m.get("weight", 1.0)) for m in models])
        if len(weights) != len(paths):
            raise UserError(f"{args.config}: {len(weights)} models for {len(paths)} CSVs")
    elif args.weights:
        if len(args.weights) != len(paths):
            raise UserError(f"--weights: {len(args.weights)} weights for {len(paths)} CSVs")
        weights = np.array(args.weights)
    else:
        weights = np.ones(len(paths))
    if (weights < 0).any() or weights.sum() <= 0:
        raise UserError("weights must be non-negative and not all zero")
    weights = weights / weights.sum()
    report["weights"] = dict(zip(names, weights.round(6).tolist()))
    print("weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))

    probs = pd.DataFrame(
        combine(stack, weights, args.method), index=frames[0].index, columns=classes
    )
    sample_path = args.data_dir / "sample_submission.csv" if args.data_dir else None
    sample = data.sample_submission if data is not None else None
    submission = format_submission(probs, sample, sample_path, args.threshold)
    atomic_to_csv(submission, args.out)
    report_path = args.report or args.out.with_suffix(".json")
    atomic_write_text(report_path, json.dumps(report, indent=2))
    if args.fit_weights:
        from leaf_xla.report import roc_plot

        roc_plot(
            targets,
            ensemble_oof,
            classes,
            report_path.with_suffix(".roc.png"),
            "ensemble, out-of-fold",
        )
    print(f"wrote {args.out} ({len(submission)} rows) and {report_path}")


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
