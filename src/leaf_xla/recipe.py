"""The whole job of an ensemble config: train every model on every listed fold, predict the test
set, ensemble, and print a summary. Each step is a subprocess running the same CLI a user would.

    python -m leaf_xla.recipe --config ensemble --data-dir data/plant-pathology-2020-fgvc7 \\
        --out-dir runs [--fit-weights] [--resume] [-- --epochs 10 ...extra train options]

The ensemble config (YAML; every key but `models` optional):

    folds: [0, 1]              # the folds to train (default [0]), each below train's n_folds
    tta: [none, hflip]         # views predict averages: none, hflip, vflip, hvflip
    fit_weights: false         # fit the weights on out-of-fold predictions (or --fit-weights)
    models:
      - name: b7               # run folders <name>-fold<k>; also the timm model, unless set
        config: tf_efficientnet_b7   # a training config: a path or a shipped name
        weight: 1.0            # the member's ensemble weight
        args: {epochs: 10}     # train options for this member, as in a training config
    distill: {alpha: 0.3, from: ensemble, members: [b7], weight: 1.0}   # see below

Options after `--` go to every train run (`-- --epochs 3 --device cpu`). `--resume`
continues interrupted runs (train says which are finished); prediction and the ensemble always
run again.

Self-distillation (`distill`): once every fold of the first round has trained, each training
image gets the target `alpha * OOF + (1 - alpha) * label`, where OOF is the out-of-fold
prediction of `from` (a member's name, or `ensemble`: the members' OOF predictions with the
ensemble's weights). Each member of `members` (default: all) then trains again on those targets
with the same folds and options, as `<name>-distill`, and joins the ensemble (weight: `weight`,
default its member's). An image's OOF prediction comes from the run of the fold that holds it
out, the one model that never trained on it; every fold must be listed.
Outputs: <out-dir>/<name>-fold<k>/ runs, <out-dir>/predictions/<name>.csv,
<out-dir>/submission.csv, submission.json (weights, out-of-fold scores), submission_roc.png,
summary.json; with `distill`: <out-dir>/distill/soft_targets.csv. Runs, tables and weights are
scored by the competition's metric (train's `--metric`, passed after `--`; by default the label
format's: see metrics.py), with ROC AUC beside it.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla import folds as folds_module
from leaf_xla import runtime
from leaf_xla.cli import ArgumentParser, UserError
from leaf_xla.config import find_config, load_yaml, parse_args
from leaf_xla.data import DataSet, parse_image_size, read_dataset
from leaf_xla.files import atomic_write_text
from leaf_xla.metrics import METRICS, resolve
from leaf_xla.rundir import check_name, hold_lock
from leaf_xla.soft_targets import mix
from leaf_xla.tta import TTA_FLIPS

MODEL_KEYS = {"name", "config", "weight", "args"}
RECIPE_KEYS = {"folds", "tta", "fit_weights", "models", "distill"}
DISTILL_KEYS = {"alpha", "from", "members", "weight"}
TEACHER_ENSEMBLE = "ensemble"


@dataclass
class Run:
    """One training run of the recipe: a model on a fold, and the options train will see."""

    model: str
    fold: int
    dir: Path
    command: list[str]
    options: argparse.Namespace


def _as_options(overrides: dict) -> list[str]:
    options = []
    for key, value in overrides.items():
        flag = f"--{str(key).replace('_', '-')}"
        if isinstance(value, bool):
            options.append(flag if value else f"--no-{flag[2:]}")
        elif flag == "--image-size":  # [480, 768] is one value: 480x768
            options += [flag, str(parse_image_size(value))]
        elif isinstance(value, list):
            options += [flag, *map(str, value)]
        else:
            options += [flag, str(value)]
    return options


def load_recipe(path: Path) -> dict:
    """The ensemble config, checked before anything trains."""
    recipe = load_yaml(path)
    if "models" not in recipe and set(recipe) - RECIPE_KEYS:
        raise UserError(
            f"{path} is a training config, not an ensemble config (it lists no models): give "
            "it to python -m leaf_xla.train --config, or name it in an ensemble config's "
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


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _run(command: list[str]) -> None:
    print(
        "$ " + " ".join(command[2:] if command[:2] == [sys.executable, "-m"] else command),
        flush=True,
    )
    code = subprocess.run(command).returncode
    if code != 0:  # the step printed its one error line: the recipe adds no second one
        print(f"recipe stopped: the step above failed ({' '.join(command[2:4])})", file=sys.stderr)
        sys.exit(code)


def plan_runs(
    models: list[dict],
    fold_list: list[int],
    args: argparse.Namespace,
    extra: list[str],
    recipe_path: Path | str = "recipe",
) -> list[Run]:
    """Every model x fold train command, parsed as train will parse it (bad options and folds
    fail here, naming the recipe file and the model, not after the first model has trained)."""
    from leaf_xla.train import build_parser

    try:
        build_parser().parse_args(extra)
    except UserError as err:
        raise UserError(f"the train options after --: {err}") from None
    runs = []
    for model in models:
        try:
            runs += _plan_model(model, fold_list, args, extra)
        except UserError as err:
            raise UserError(f"{recipe_path}: model {model['name']}: {err}") from None
    return runs


def _plan_model(
    model: dict,
    fold_list: list[int],
    args: argparse.Namespace,
    extra: list[str],
) -> list[Run]:
    """One model's runs (see plan_runs)."""
    from leaf_xla.train import build_parser

    runs = []
    name = str(model["name"])
    overrides = model.get("args", {})
    train_config = {}
    config_args = []
    if "config" in model:
        path = find_config(str(model["config"]))
        train_config = load_yaml(path)
        config_args = ["--config", str(path)]
    arch = overrides.get("model") or train_config.get("model") or name
    for fold in fold_list:
        run_name = f"{name}-fold{fold}"
        train_args = [
            *("--data-dir", str(args.data_dir), "--out-dir", str(args.out_dir)),
            *("--run-name", run_name, "--fold", str(fold)),
            *runtime.launch_options(runtime.launch_from_args(args)),
            *config_args,
            *("--model", str(arch)),
            *_as_options({k: v for k, v in overrides.items() if k != "model"}),
            *extra,
        ]
        options = parse_args(build_parser(), train_args)
        if options.weights and not Path(options.weights).is_file():
            raise UserError(
                f"weights file {options.weights} not found (e.g. convert Keras' "
                "ResNet152V2 file with python -m leaf_xla.convert_keras, see its config)"
            )
        folds = 1 if options.holdout is not None else options.n_folds
        if fold >= folds:
            split = (
                "a --holdout split (fold 0)" if folds == 1 else f"{folds} folds (0..{folds - 1})"
            )
            raise UserError(f"folds lists fold {fold}, but it trains with {split}")
        command = [sys.executable, "-m", "leaf_xla.train", *train_args]
        runs.append(Run(name, fold, args.out_dir / run_name, command, options))
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(
        prog="python -m leaf_xla.recipe",
        usage="%(prog)s [--config YAML] --data-dir DIR --out-dir DIR [options] "
        "[-- TRAIN OPTIONS...]",
        description=__doc__,  # the ensemble YAML's keys and the `--` pass-through
    )
    parser.add_argument("--config", default="ensemble", help="ensemble YAML (or its name)")
    parser.add_argument("--data-dir", type=Path, required=True, help="competition folder")
    parser.add_argument("--out-dir", type=Path, required=True, help="runs, predictions, submission")
    runtime.add_launch_options(parser)  # passed to train and predict
    parser.add_argument(
        "--fit-weights",
        action="store_true",
        help="fit the weights on out-of-fold predictions (overrides the config)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip finished runs and resume interrupted ones"
    )
    args = parser.parse_args(argv)
    # One recipe per output folder (its predictions and submission); each train locks its run.
    hold_lock(args.out_dir / ".recipe.lock", f"output folder {args.out_dir} (recipe)")
    recipe_path = find_config(args.config)
    recipe = load_recipe(recipe_path)
    tta = [str(t) for t in recipe.get("tta", ["none"])]
    fit = args.fit_weights or bool(recipe.get("fit_weights", False))
    fold_list = [int(f) for f in recipe.get("folds", [0])]
    models = recipe["models"]
    runs = plan_runs(models, fold_list, args, extra, recipe_path)
    students, soft_csv = [], args.out_dir / "distill" / "soft_targets.csv"
    if "distill" in recipe:
        check_every_fold(recipe_path, recipe, runs, fold_list)
        distilled = distilled_models(recipe, soft_csv)
        students = plan_runs(distilled, fold_list, args, extra, recipe_path)
    read_dataset(args.data_dir, need_test=True)  # fail on bad data before the first compile
    if not args.resume:
        started = [
            r.dir for r in runs + students if not r.options.overwrite and any(r.dir.glob("*.pt"))
        ]
        if started:
            raise UserError(
                f"{started[0]} already holds checkpoints: pass --resume to skip finished runs "
                "and continue the others, or -- --overwrite to train them again"
            )

    members = [train_and_predict(m, runs, args, tta) for m in models]
    if students:
        rewritten = write_soft_targets(recipe, runs, students, args, fit, soft_csv)
        distilled = distilled_models(recipe, soft_csv)
        # Runs on targets just rewritten start again (with --overwrite: the old ones go aside).
        members += [
            train_and_predict(m, students, args, tta, resume=not rewritten) for m in distilled
        ]

    predictions, oofs, weights = (list(column) for column in zip(*members))
    submission = args.out_dir / "submission.csv"
    command = [
        *(sys.executable, "-m", "leaf_xla.ensemble"),
        *predictions,
        *("--data-dir", str(args.data_dir), "--out", str(submission), "--overwrite"),
    ]
    command += ["--fit-weights", *oofs] if fit else ["--weights", *weights, "--oof", *oofs]
    command += ["--metric", runs[0].options.metric]  # as train scored the runs
    _run(command)
    summarize(args.out_dir, runs + students, submission)


def train_and_predict(
    model: dict, runs: list[Run], args: argparse.Namespace, tta: list[str], resume: bool = True
) -> tuple[str, str, str]:
    """Train a model's runs (resumed under --resume unless `resume` is false), predict the
    test set with them; (predictions CSV, its comma-separated OOF files, weight) for the
    ensemble."""
    name = str(model["name"])
    mine = [r for r in runs if r.model == name]
    for run in mine:
        # Train decides whether a run is finished, together with every other host (a pod's
        # hosts each read their own disk, and must not part ways here).
        resumed = resume and args.resume and (run.dir / "last.pt").is_file()
        _run(run.command + (["--resume"] if resumed else []))
    out = args.out_dir / "predictions" / f"{name}.csv"
    _run(
        [
            *(sys.executable, "-m", "leaf_xla.predict"),
            "--checkpoint",
            *[str(r.dir / "best.pt") for r in mine],
            *("--data-dir", str(args.data_dir), "--out", str(out), "--tta", *tta),
            *runtime.launch_options(runtime.launch_from_args(args)),
            "--overwrite",
        ]
    )
    oofs = ",".join(str(r.dir / "oof.csv") for r in mine)
    return str(out), oofs, str(float(model.get("weight", 1.0)))


def _teachers(recipe: dict) -> list[str]:
    teacher = str(recipe["distill"].get("from", TEACHER_ENSEMBLE))
    return [str(m["name"]) for m in recipe["models"]] if teacher == TEACHER_ENSEMBLE else [teacher]


def check_every_fold(path: Path, recipe: dict, runs: list[Run], fold_list: list[int]) -> None:
    """Distillation needs an out-of-fold prediction for every training image: every fold of
    each teacher model trains (refused before anything trains)."""
    for name in _teachers(recipe):
        options = next(r.options for r in runs if r.model == name)
        every = list(range(options.n_folds))
        if options.holdout is not None or sorted(fold_list) != every:
            split = "a --holdout split" if options.holdout is not None else f"folds {fold_list}"
            raise UserError(
                f"{path}: distill needs an out-of-fold prediction for every training image, so "
                f"every fold of {name} must train, not {split}: list folds: {every} (or set "
                "n_folds to match)"
            )


def out_of_fold(runs: list[Run], data: DataSet) -> np.ndarray:
    """One model's out-of-fold predictions in train.csv's order: each image's row comes from the
    run of the fold that holds it out, the one model of its folds that never trained on it.

    Each run's oof.csv must list exactly its fold's validation images in the folds file; with
    every fold listed, that is every training image once.
    """
    from leaf_xla.ensemble import read_predictions

    options = runs[0].options
    folds_file = options.folds_file or options.out_dir / "folds.csv"
    fold_of = folds_module.load_or_create(
        folds_file,
        data.train.ids,
        data.train.targets,
        options.n_folds,
        options.fold_seed,
        options.holdout,
    )
    frames = []
    for run in runs:
        path = run.dir / "oof.csv"
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
    runs: list[Run],
    students: list[Run],
    args: argparse.Namespace,
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
    options = next(r.options for r in runs if r.model == names[0])
    data = read_dataset(args.data_dir, options.label_format, options.classes)
    labels = data.train.targets.astype(np.float64)
    stack = np.stack([out_of_fold([r for r in runs if r.model == n], data) for n in names])
    weights = np.array([float(m.get("weight", 1.0)) for m in recipe["models"]])
    if len(names) > 1 and fit:
        metric = resolve(options.metric, data.label_format, data.multilabel)
        weights, _ = fit_weights(stack, labels, metric=metric)
    if len(names) > 1 and weights.sum() <= 0:
        raise UserError("distill from the ensemble: the models' weights are all 0")
    teacher = stack[0] if len(names) == 1 else combine(stack, weights / weights.sum(), "mean")
    frame = pd.DataFrame(mix(teacher, labels, float(distill["alpha"])), columns=data.classes)
    frame.insert(0, "image_id", data.train.ids)
    text = frame.to_csv(index=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if path.is_file():
        if hashlib.sha256(path.read_bytes()).hexdigest()[:16] == digest:
            print(f"soft targets: {path} is up to date (sha256 {digest})")
            return False
        if not all(r.options.overwrite for r in students):
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


def summarize(out_dir: Path, runs: list[Run], submission: Path) -> dict:
    """summary.json: each run's best validation score (the metric, and AUC), and the out-of-fold
    score of each model and of the ensemble (its weights) from the ensemble's report."""
    report = json.loads(submission.with_suffix(".json").read_text())
    oof = report["oof"]
    metric = METRICS[oof.get("metric", "auc")]
    best = {}
    for run in runs:
        history = pd.read_csv(run.dir / "history.csv")
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


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
