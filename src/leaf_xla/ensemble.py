"""The ensemble: per-model prediction CSVs averaged into a checked Kaggle submission, the
weights given, taken from an ensemble config, or fitted on out-of-fold predictions to maximise
the competition's metric, and a report of how each member scores (`ensemble(settings)`; the
options are explained in commands/ensemble.py).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla.config import find_config, load_yaml
from leaf_xla.data import DataSet, read_csv, read_dataset
from leaf_xla.ensemble_fit import combine, fit_weights
from leaf_xla.errors import UserError, first_few, not_a_command
from leaf_xla.files import atomic_to_csv, atomic_write_text
from leaf_xla.formats import format_submission, id_column, submission_format
from leaf_xla.metrics import (
    Metric,
    best_threshold,
    chance,
    column_auc,
    mean_auc,
    near_chance,
    resolve,
)


def read_predictions(path: Path, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """A prediction CSV indexed by image_id, checked: ids present and unique, the class columns
    (reordered to `classes`), finite numbers."""
    frame = read_csv(path, missing="expected a prediction CSV (predict --out)")
    ids = id_column(frame, path)
    if frame.empty:
        raise UserError(f"{path}: no prediction rows")
    blank = np.flatnonzero(frame[ids].isna().to_numpy())
    if len(blank):
        raise UserError(f"{path}: empty image_id on line(s) {first_few((blank + 2).tolist())}")
    frame = frame.rename(columns={ids: "image_id"}).set_index("image_id")
    duplicated = frame.index[frame.index.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(f"{path}: duplicate image ids {first_few(duplicated)}")
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
        raise UserError(f"{path}: non-finite or non-numeric values for ids {first_few(bad)}")
    return values.astype(float)


def align(frames: list[pd.DataFrame], paths: list[Path]) -> list[pd.DataFrame]:
    """All frames on the first one's id order; any id set mismatch is an error naming ids."""
    reference = frames[0].index
    for frame, path in zip(frames[1:], paths[1:]):
        missing = reference.difference(frame.index, sort=False).tolist()
        extra = frame.index.difference(reference, sort=False).tolist()
        if missing or extra:
            what = (
                f"lacks ids {first_few(missing)} that {paths[0]} has"
                if missing
                else f"has ids not in {paths[0]}: {first_few(extra)}"
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
            f"{', '.join(map(str, files))}: ids {first_few(duplicated)} appear in more than one "
            "file"
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
    raise UserError(f"the same prediction CSV is given twice: {first_few([str(p) for p in paths])}")


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


@dataclass(frozen=True)
class EnsembleSettings:
    """What `leaf-xla ensemble` is told (each field is the option of that name)."""

    predictions: list[Path]  # test prediction CSVs, one per model
    out: Path  # the submission CSV
    report: Path | None = None  # the JSON report (default: <out>.json)
    weights: list[float] | None = None  # one per model (normalised)
    config: str | None = None  # an ensemble YAML whose models' weights to use
    fit_weights: list[str] | None = None  # OOF sets (files, globs, a,b,c) to fit weights on
    oof: list[str] | None = None  # OOF sets to score the weights on
    method: str = "mean"  # or rank
    data_dir: Path | None = None
    threshold: float | None = None  # multi-label: the probability for a label
    metric: str = "auto"
    overwrite: bool = False


def ensemble(settings: EnsembleSettings) -> dict:
    """Average the prediction CSVs into a checked submission; returns the report it writes."""
    s = settings
    report_path = s.report or s.out.with_suffix(".json")
    check_settings(s, report_path)
    paths = [Path(p) for p in s.predictions]
    names = _model_names(paths)
    frames = [read_predictions(paths[0])]
    classes = list(frames[0].columns)
    frames += [read_predictions(p, classes) for p in paths[1:]]
    frames = align(frames, paths)
    stack = np.stack([f.to_numpy(float) for f in frames])
    oof_patterns = s.fit_weights or s.oof
    data = (
        read_dataset(s.data_dir, classes=classes, need_train=bool(oof_patterns))
        if s.data_dir
        else None
    )
    sample = data.sample_submission if data is not None else None
    sample_path = s.data_dir / "sample_submission.csv" if s.data_dir else None
    label_format = data.label_format if data is not None else None
    if s.method == "rank" and sample is not None:
        if not _writes_probabilities(sample, sample_path, classes, label_format):
            raise UserError(
                f"--method rank gives ranks, not the probabilities that the labels of "
                f"{sample_path} are chosen from: use --method mean"
            )
    report: dict = {"models": names, "method": s.method}
    oof = read_oof(s, data, classes, len(paths)) if oof_patterns else None
    weights, source = choose_weights(s, oof, names, report)
    report["weights"] = dict(zip(names, weights.round(6).tolist()))
    report["weights_from"] = source
    threshold, warnings = 0.5 if s.threshold is None else s.threshold, []
    if oof is not None:
        threshold, warnings = score_members(s, oof, weights, names, classes, report)
    report["threshold"] = threshold
    print(f"weights ({source}): " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights)))
    probs = pd.DataFrame(combine(stack, weights, s.method), index=frames[0].index, columns=classes)
    submission = format_submission(probs, sample, sample_path, threshold, label_format)
    atomic_to_csv(submission, s.out)
    report["submission"] = str(s.out)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    written = [str(s.out), str(report_path)]
    if oof is not None:
        from leaf_xla.report import roc_plot

        roc_path = report_path.with_name(f"{report_path.stem}_roc.png")
        roc_plot(oof.targets, oof.combined(weights), classes, roc_path, "ensemble, out-of-fold")
        written.append(str(roc_path))
    print(f"wrote {', '.join(written)} ({len(submission)} rows)")
    for line in warnings:
        print(f"warning: {line}")
    return report


def check_settings(s: EnsembleSettings, report_path: Path) -> None:
    for path in (s.out, report_path):
        if path.exists() and not s.overwrite:
            raise UserError(f"{path} exists: pass --overwrite to replace it")
    if s.fit_weights and s.oof:
        raise UserError("--oof and --fit-weights both name OOF files: give one of them")
    if s.threshold is not None and not 0 < s.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1, got {s.threshold}")
    if (s.fit_weights or s.oof) and not s.data_dir:
        raise UserError("OOF predictions need --data-dir for the training labels")


def read_oof(s: EnsembleSettings, data: DataSet, classes: list[str], models: int) -> OutOfFold:
    """The members' out-of-fold predictions (--fit-weights or --oof), with their labels."""
    groups = expand(s.fit_weights or s.oof)
    if len(groups) != models:
        option = "--fit-weights" if s.fit_weights else "--oof"
        raise UserError(f"{option}: {len(groups)} OOF sets for {models} prediction CSVs")
    oof_frames = align([read_group(g, classes) for g in groups], [g[0] for g in groups])
    label_of = dict(zip(data.train.ids, data.train.targets))
    unknown = [i for i in oof_frames[0].index if i not in label_of]
    if unknown:
        raise UserError(f"{groups[0][0]}: ids not in train.csv: {first_few(unknown)}")
    targets = np.stack([label_of[i] for i in oof_frames[0].index])
    metric = resolve(s.metric, data.label_format, data.multilabel)
    stack = np.stack([f.to_numpy(float) for f in oof_frames])
    return OutOfFold(stack, targets, metric, s.method, s.threshold)


def choose_weights(
    s: EnsembleSettings, oof: OutOfFold | None, names: list[str], report: dict
) -> tuple[np.ndarray, str]:
    """The members' weights, normalised, and where they come from."""
    if s.fit_weights:
        weights, cv = fit_weights(oof.stack, oof.targets, s.method, metric=oof.metric)
        report["fit"] = cv
        source = "fitted" if cv["kept"] == "fitted" else "equal: fitted weights overfit"
        print(
            f"held-out OOF {oof.metric.name} {cv['heldout_score_fitted']:.4f} fitted vs "
            f"{cv['heldout_score_equal']:.4f} equal weights ({cv['splits']} splits)"
        )
    elif s.config:
        weights, source = config_weights(find_config(s.config), names), s.config
    elif s.weights:
        if len(s.weights) != len(names):
            raise UserError(f"--weights: {len(s.weights)} weights for {len(names)} CSVs")
        weights, source = np.array(s.weights), "--weights"
    else:
        weights, source = np.ones(len(names)), "equal"
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise UserError(
            f"weights ({source}) must be non-negative, finite and not all zero, "
            f"got {weights.tolist()}"
        )
    return weights / weights.sum(), source


def score_members(
    s: EnsembleSettings,
    oof: OutOfFold,
    weights: np.ndarray,
    names: list[str],
    classes: list[str],
    report: dict,
) -> tuple[float, list[str]]:
    """Out-of-fold scores of the members and the ensemble (printed and reported), the decision
    threshold, and the warnings about members that hurt."""
    metric = oof.metric
    report["metric"] = metric.name
    report["oof"] = score_oof(oof, weights, names, classes)
    print_scores(report["oof"], classes, metric)
    print(f"equal weights: OOF {metric.name} {report['oof']['equal_weights_score']:.4f}")
    threshold = 0.5 if s.threshold is None else s.threshold
    if metric.thresholded:
        threshold = oof.threshold_for(oof.combined(weights))
        chosen = "given" if s.threshold is not None else "best out-of-fold"
        print(f"decision threshold {threshold:.2f} ({chosen} {metric.title})")
    warnings = advice(oof, report["oof"], weights, fitted=bool(s.fit_weights))
    report["warnings"] = warnings
    return threshold, warnings


if __name__ == "__main__":  # the command is leaf_xla/commands/ensemble.py
    not_a_command("leaf_xla.ensemble", "ensemble")
