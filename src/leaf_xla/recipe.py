"""The whole job of an ensemble config: train every model on every listed fold, predict the test
set, ensemble, and print a summary. Each step is a subprocess running the same CLI a user would.

    python -m leaf_xla.recipe --config ensemble --data-dir data/plant-pathology-2020-fgvc7 \\
        --out-dir runs [--fit-weights] [--resume] [-- --epochs 10 ...extra train options]

Ensemble config keys: `folds` (list), `tta` (list), `fit_weights` (bool), `models`: a list of
{name, config (a training config), weight, args (training option overrides)}. Options after
`--` go to every train run. `--resume` continues interrupted runs (train says which are finished);
prediction and the ensemble always run again.
Outputs: <out-dir>/<name>-fold<k>/ runs, <out-dir>/predictions/<name>.csv,
<out-dir>/submission.csv, submission.json (weights, out-of-fold AUCs), submission_roc.png,
summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from leaf_xla import runtime
from leaf_xla.cli import UserError
from leaf_xla.config import find_config, load_yaml, parse_args
from leaf_xla.data import parse_image_size, read_dataset
from leaf_xla.files import atomic_write_text
from leaf_xla.rundir import check_name, hold_lock
from leaf_xla.tta import TTA_FLIPS

MODEL_KEYS = {"name", "config", "weight", "args"}
RECIPE_KEYS = {"folds", "tta", "fit_weights", "models"}


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
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(sorted(RECIPE_KEYS))}"
        )
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
        if not isinstance(model, dict) or set(model) - MODEL_KEYS or "name" not in model:
            raise UserError(
                f"{path}: models[{k}] needs a name and may have "
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
    return recipe


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


def plan_runs(recipe: dict, args: argparse.Namespace, extra: list[str]) -> list[Run]:
    """Every model x fold train command, parsed as train will parse it (bad options fail here,
    not after the first model has trained)."""
    from leaf_xla.train import build_parser

    runs = []
    for model in recipe["models"]:
        name = str(model["name"])
        overrides = model.get("args", {})
        train_config = {}
        config_args = []
        if "config" in model:
            path = find_config(str(model["config"]))
            train_config = load_yaml(path)
            config_args = ["--config", str(path)]
        arch = overrides.get("model") or train_config.get("model") or name
        for fold in recipe.get("folds", [0]):
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
                    f"{name}: weights file {options.weights} not found (e.g. convert Keras' "
                    "ResNet152V2 file with python -m leaf_xla.convert_keras, see its config)"
                )
            command = [sys.executable, "-m", "leaf_xla.train", *train_args]
            runs.append(Run(name, fold, args.out_dir / run_name, command, options))
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m leaf_xla.recipe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", default="ensemble", help="ensemble YAML (or its name)")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
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
    read_dataset(args.data_dir, need_test=True)  # fail on bad data before the first compile
    runs = plan_runs(recipe, args, extra)
    if not args.resume:
        started = [r.dir for r in runs if not r.options.overwrite and any(r.dir.glob("*.pt"))]
        if started:
            raise UserError(
                f"{started[0]} already holds checkpoints: pass --resume to skip finished runs "
                "and continue the others, or -- --overwrite to train them again"
            )

    python = [sys.executable, "-m"]
    predictions, oofs, weights = [], [], []
    for model in recipe["models"]:
        name = str(model["name"])
        mine = [r for r in runs if r.model == name]
        for run in mine:
            # Train decides whether a run is finished, together with every other host (a pod's
            # hosts each read their own disk, and must not part ways here).
            resume = args.resume and (run.dir / "last.pt").is_file()
            _run(run.command + (["--resume"] if resume else []))
        out = args.out_dir / "predictions" / f"{name}.csv"
        _run(
            [
                *python,
                "leaf_xla.predict",
                "--checkpoint",
                *[str(r.dir / "best.pt") for r in mine],
                *("--data-dir", str(args.data_dir), "--out", str(out), "--tta", *tta),
                *runtime.launch_options(runtime.launch_from_args(args)),
                "--overwrite",
            ]
        )
        predictions.append(str(out))
        oofs.append(",".join(str(r.dir / "oof.csv") for r in mine))
        weights.append(str(float(model.get("weight", 1.0))))

    submission = args.out_dir / "submission.csv"
    command = [
        *python,
        "leaf_xla.ensemble",
        *predictions,
        *("--data-dir", str(args.data_dir), "--out", str(submission), "--overwrite"),
    ]
    command += ["--fit-weights", *oofs] if fit else ["--weights", *weights, "--oof", *oofs]
    _run(command)
    summarize(args.out_dir, runs, submission)


def summarize(out_dir: Path, runs: list[Run], submission: Path) -> dict:
    """summary.json: each run's best validation AUC, and the out-of-fold AUC of each model and
    of the ensemble (its weights) from the ensemble's report."""
    report = json.loads(submission.with_suffix(".json").read_text())
    oof = report["oof"]
    best = {}
    for run in runs:
        history = pd.read_csv(run.dir / "history.csv")
        best[run.dir.name] = {
            "best_val_auc": float(history["val_auc"].max()),
            "epochs": len(history),
        }
    summary = {
        "runs": best,
        "models": {n: s["auc"] for n, s in oof["per_model"].items()},
        "ensemble": oof["ensemble"]["auc"],
        "per_class": {
            **{n: s["per_class"] for n, s in oof["per_model"].items()},
            "ensemble": oof["ensemble"]["per_class"],
        },
        "weights": report["weights"],
        "weights_from": report["weights_from"],
        "validation_images": oof["rows"],
        "submission": str(submission),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    width = max(map(len, [*summary["models"], "ensemble"]))
    print("\nout-of-fold mean column-wise ROC AUC")
    for name, auc in summary["models"].items():
        print(f"  {name:<{width}}  {auc:.4f}  weight {summary['weights'][name]:.3f}")
    print(f"  {'ensemble':<{width}}  {summary['ensemble']:.4f}")
    print(f"submission: {submission}; summary: {out_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
