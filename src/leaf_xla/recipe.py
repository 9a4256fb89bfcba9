"""An ensemble config (a recipe): its checks, its distillation round, and what ties its runs
together: out-of-fold predictions in train.csv's order, soft targets, the summary. Running it,
each step a subprocess of the same CLI a user would run, is commands/recipe.py's.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla import folds as folds_module
from leaf_xla.config import load_yaml
from leaf_xla.data import DataSet, read_dataset
from leaf_xla.errors import UserError, not_a_command
from leaf_xla.files import atomic_write_text
from leaf_xla.metrics import METRICS, resolve
from leaf_xla.rundir import HISTORY, OOF, check_name, folds_file_of
from leaf_xla.settings import TrainSettings
from leaf_xla.soft_targets import blend
from leaf_xla.tta import TTA_FLIPS

MODEL_KEYS = {"name", "config", "weight", "args"}
RECIPE_KEYS = {"folds", "tta", "fit_weights", "models", "distill"}
DISTILL_KEYS = {"alpha", "from", "members", "weight"}
TEACHER_ENSEMBLE = "ensemble"


@dataclass
class PlannedRun:
    """One training run of the recipe: a model on a fold, and the settings train will see."""

    model: str
    fold: int
    dir: Path
    command: list[str]  # the train command line that runs it
    settings: TrainSettings


def load_recipe(path: Path) -> dict:
    """The ensemble config, checked before anything trains."""
    recipe = load_yaml(path)
    if "models" not in recipe and set(recipe) - RECIPE_KEYS:
        raise UserError(
            f"{path} is a training config, not an ensemble config (it lists no models): give "
            "it to leaf-xla train --config, or name it in an ensemble config's "
            "models (config: ...)"
        )
    _check_keys(f"{path}:", recipe, RECIPE_KEYS)
    folds = recipe.get("folds", [0])
    if not isinstance(folds, list) or not folds or not all(_whole(f) and f >= 0 for f in folds):
        raise UserError(f"{path}: 'folds' must be a list of fold numbers, got {folds!r}")
    if len(set(folds)) != len(folds):
        raise UserError(f"{path}: 'folds' lists a fold twice: {folds}")
    tta = recipe.get("tta", ["none"])
    if not isinstance(tta, list) or not tta or not set(map(str, tta)) <= set(TTA_FLIPS):
        raise UserError(f"{path}: 'tta' must be a list of {', '.join(TTA_FLIPS)}, got {tta!r}")
    if not isinstance(recipe.get("fit_weights", False), bool):
        raise UserError(f"{path}: 'fit_weights' must be true or false")
    models = recipe.get("models")
    if not isinstance(models, list) or not models:
        raise UserError(f"{path}: 'models' must be a non-empty list")
    for k, model in enumerate(models):
        if not isinstance(model, dict):
            raise UserError(f"{path}: models[{k}] must be a mapping with a name, got {model!r}")
        _check_keys(f"{path}: models[{k}]", model, MODEL_KEYS)
        if "name" not in model:
            raise UserError(
                f"{path}: models[{k}] needs a name (its run folders' name, and the timm model "
                f"unless args sets model); it may also have "
                f"{', '.join(sorted(MODEL_KEYS - {'name'}))}"
            )
        weight = model.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"{path}: models[{k}] weight must be a number >= 0, got {weight!r}")
        if not isinstance(model.get("args", {}), dict):
            raise UserError(f"{path}: models[{k}] args must be a mapping of option: value")
        check_name(str(model["name"]), f"{path}: models[{k}] name")
    names = [str(m["name"]) for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: model names must differ (they name the run folders): {names}")
    if "distill" in recipe:
        _check_distill(path, recipe["distill"], names)
    return recipe


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(where: str, mapping: dict, allowed: set[str]) -> None:
    """An unknown key is named, with the closest allowed one."""
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            if key == "model" and "name" in allowed:
                hint = "the timm model goes in args: {model: ...}, or is the name; "
            raise UserError(
                f"{where} unknown key {key!r} ({hint}expected {', '.join(sorted(allowed))})"
            )


def _check_distill(path: Path, distill: object, names: list[str]) -> None:
    where = f"{path}: distill"
    if isinstance(distill, dict):
        _check_keys(f"{where}:", distill, DISTILL_KEYS)
    if not isinstance(distill, dict) or "alpha" not in distill:
        raise UserError(
            f"{where} needs alpha and may have {', '.join(sorted(DISTILL_KEYS - {'alpha'}))}"
        )
    alpha = distill["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise UserError(f"{where} alpha must be a number in (0, 1], got {alpha!r}")
    teacher = str(distill.get("from", TEACHER_ENSEMBLE))
    if teacher not in (TEACHER_ENSEMBLE, *names) or TEACHER_ENSEMBLE in names:
        raise UserError(
            f"{where} from must be {TEACHER_ENSEMBLE} or a model's name ({', '.join(names)}), "
            f"got {teacher!r}"
        )
    members = distill.get("members", names)
    if not isinstance(members, list) or not members or not set(map(str, members)) <= set(names):
        raise UserError(f"{where} members must be a list of model names, got {members!r}")
    weight = distill.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise UserError(f"{where} weight must be a number >= 0, got {weight!r}")
    clash = sorted(set(names) & {distilled_name(str(m)) for m in members})
    if clash:
        raise UserError(f"{where}: a model is named {clash[0]}, the name of a distilled member")


def distilled_name(name: str) -> str:
    return f"{name}-distill"


def distilled_models(recipe: dict, soft_csv: Path) -> list[dict]:
    """The second round's models: each distilled member's entry, renamed, on the soft targets."""
    distill = recipe["distill"]
    members = [str(m) for m in distill.get("members", [m["name"] for m in recipe["models"]])]
    models = []
    for model in recipe["models"]:
        if str(model["name"]) in members:
            models.append(
                {
                    **model,
                    "name": distilled_name(str(model["name"])),
                    "weight": distill.get("weight", model.get("weight", 1.0)),
                    "args": {**model.get("args", {}), "soft_targets": str(soft_csv)},
                }
            )
    return models


def _teachers(recipe: dict) -> list[str]:
    teacher = str(recipe["distill"].get("from", TEACHER_ENSEMBLE))
    return [str(m["name"]) for m in recipe["models"]] if teacher == TEACHER_ENSEMBLE else [teacher]


def check_every_fold(
    path: Path, recipe: dict, runs: list[PlannedRun], fold_list: list[int]
) -> None:
    """Distillation needs an out-of-fold prediction for every training image: every fold of
    each teacher model trains (refused before anything trains)."""
    for name in _teachers(recipe):
        data = next(r.settings.data for r in runs if r.model == name)
        every = list(range(data.n_folds))
        if data.holdout is not None or sorted(fold_list) != every:
            split = "a --holdout split" if data.holdout is not None else f"folds {fold_list}"
            raise UserError(
                f"{path}: distill needs an out-of-fold prediction for every training image, so "
                f"every fold of {name} must train, not {split}: list folds: {every} (or set "
                "n_folds to match)"
            )


def out_of_fold(runs: list[PlannedRun], data: DataSet) -> np.ndarray:
    """One model's out-of-fold predictions in train.csv's order: each image's row comes from the
    run of the fold that holds it out, the one model of its folds that never trained on it.

    Each run's oof.csv must list exactly its fold's validation images in the folds file; with
    every fold listed, that is every training image once.
    """
    from leaf_xla.ensemble import read_predictions

    settings = runs[0].settings.data
    folds_file = folds_file_of(settings)
    fold_of = folds_module.load_or_create(
        folds_file,
        data.train.ids,
        data.train.targets,
        settings.n_folds,
        settings.fold_seed,
        settings.holdout,
    )
    frames = []
    for run in runs:
        path = run.dir / OOF
        oof = read_predictions(path, data.classes)
        held_out = [i for i, f in zip(data.train.ids, fold_of) if f == run.fold]
        if sorted(oof.index) != sorted(held_out):
            raise UserError(
                f"{path}: its images are not fold {run.fold}'s validation images in "
                f"{folds_file}; train the run again (-- --overwrite)"
            )
        frames.append(oof)
    frame = pd.concat(frames)
    missing = sorted(set(data.train.ids) - set(frame.index))
    if missing:
        raise UserError(
            f"{runs[0].model}: no out-of-fold prediction for {len(missing)} training image(s) "
            f"({', '.join(missing[:3])}): every fold must train"
        )
    return frame.loc[data.train.ids].to_numpy(np.float64)


def write_soft_targets(
    recipe: dict,
    runs: list[PlannedRun],
    students: list[PlannedRun],
    data_dir: Path,
    fit: bool,
    path: Path,
) -> bool:
    """`alpha * OOF + (1 - alpha) * label` for every training image, written once, atomically.
    Returns whether it replaced a file of other targets (the distilled runs then start again).

    Every host computes it from its own run folders (each host's writer wrote every oof.csv)
    and so holds its own copy; train checks that the hosts' copies agree. A resumed recipe
    keeps an existing file when its bytes are what the first round gives now, and refuses a
    different one unless the distilled runs are trained again (-- --overwrite).
    """
    from leaf_xla.ensemble_fit import combine, fit_weights

    distill, names = recipe["distill"], _teachers(recipe)
    settings = next(r.settings for r in runs if r.model == names[0])
    data = read_dataset(data_dir, settings.data.label_format, settings.data.classes)
    labels = data.train.targets.astype(np.float64)
    stack = np.stack([out_of_fold([r for r in runs if r.model == n], data) for n in names])
    weights = np.array([float(m.get("weight", 1.0)) for m in recipe["models"]])
    if len(names) > 1 and fit:
        metric = resolve(settings.data.metric, data.label_format, data.multilabel)
        weights, _ = fit_weights(stack, labels, metric=metric)
    if len(names) > 1 and weights.sum() <= 0:
        raise UserError("distill from the ensemble: the models' weights are all 0")
    teacher = stack[0] if len(names) == 1 else combine(stack, weights / weights.sum(), "mean")
    frame = pd.DataFrame(blend(teacher, labels, float(distill["alpha"])), columns=data.classes)
    frame.insert(0, "image_id", data.train.ids)
    text = frame.to_csv(index=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if path.is_file():
        if hashlib.sha256(path.read_bytes()).hexdigest()[:16] == digest:
            print(f"soft targets: {path} is up to date (sha256 {digest})")
            return False
        if not all(r.settings.run.overwrite for r in students):
            raise UserError(
                f"{path} differs from the targets the first round's out-of-fold predictions "
                "give now (was a first-round run trained again?): pass --resume -- --overwrite "
                "to train the distilled members again from the start (finished first-round "
                "runs are kept), or delete the file and their runs"
            )
    replaced = path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    teacher_name = distill.get("from", TEACHER_ENSEMBLE)
    print(
        f"soft targets: wrote {path} ({len(frame)} images, alpha {distill['alpha']} x "
        f"out-of-fold {teacher_name} + (1 - alpha) x label; sha256 {digest})"
    )
    return replaced


def summarize(out_dir: Path, runs: list[PlannedRun], submission: Path) -> dict:
    """summary.json: each run's best validation score (the metric, and AUC), and the out-of-fold
    score of each model and of the ensemble (its weights) from the ensemble's report."""
    report = json.loads(submission.with_suffix(".json").read_text())
    oof = report["oof"]
    metric = METRICS[oof.get("metric", "auc")]
    best = {}
    for run in runs:
        history = pd.read_csv(run.dir / HISTORY)
        scores = {
            f"best_val_{c[4:]}": float(history[c].max())
            for c in (f"val_{metric.name}", "val_auc")
            if c in history
        }
        best[run.dir.name] = {**scores, "epochs": len(history)}
    summary = {
        "metric": metric.name,
        "runs": best,
        "models": {n: s["score"] for n, s in oof["per_model"].items()},
        "ensemble": oof["ensemble"]["score"],
        "models_auc": {n: s["auc"] for n, s in oof["per_model"].items()},
        "ensemble_auc": oof["ensemble"]["auc"],
        "per_class": {
            **{n: s["per_class"] for n, s in oof["per_model"].items()},
            "ensemble": oof["ensemble"]["per_class"],
        },
        "weights": report["weights"],
        "weights_from": report["weights_from"],
        "threshold": report["threshold"],
        "validation_images": oof["rows"],
        "warnings": report.get("warnings", []),
        "submission": str(submission),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    width = max(map(len, [*summary["models"], "ensemble"]))
    auc = "" if metric.name == "auc" else " (ROC AUC)"
    print(f"\nout-of-fold {metric.title}{auc}")
    for name, score in summary["models"].items():
        extra = "" if metric.name == "auc" else f" ({summary['models_auc'][name]:.4f})"
        print(f"  {name:<{width}}  {score:.4f}{extra}  weight {summary['weights'][name]:.3f}")
    extra = "" if metric.name == "auc" else f" ({summary['ensemble_auc']:.4f})"
    print(f"  {'ensemble':<{width}}  {summary['ensemble']:.4f}{extra}")
    for line in summary["warnings"]:
        print(f"warning: {line}")
    print(f"submission: {submission}; summary: {out_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":  # the command is leaf_xla/commands/recipe.py
    not_a_command("leaf_xla.recipe", "recipe")
