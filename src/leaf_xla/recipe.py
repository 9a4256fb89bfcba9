"""The whole job of an ensemble config: train every model on every listed fold, predict the test
set, ensemble, and print a summary. Each step is a subprocess running the same CLI a user would.

    python -m leaf_xla.recipe --config ensemble --data-dir data/plant-pathology-2020-fgvc7 \\
        --out-dir runs [--fit-weights] [--resume] [-- --epochs 10 ...extra train options]

Ensemble config keys: `folds` (list), `tta` (list), `fit_weights` (bool), `models`: a list of
{name, config (a training config), weight, args (training option overrides)}.
Outputs: <out-dir>/<name>-fold<k>/ runs, <out-dir>/predictions/<name>.csv,
<out-dir>/submission.csv, submission.json (weights, AUCs), summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leaf_xla.cli import UserError
from leaf_xla.config import find_config, load_yaml
from leaf_xla.data import read_dataset
from leaf_xla.files import atomic_write_text
from leaf_xla.metrics import mean_auc

MODEL_KEYS = {"name", "config", "weight", "args"}
RECIPE_KEYS = {"folds", "tta", "fit_weights", "models"}


def _as_options(overrides: dict) -> list[str]:
    options = []
    for key, value in overrides.items():
        flag = f"--{str(key).replace('_', '-')}"
        if isinstance(value, bool):
            options.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            options += [flag, *map(str, value)]
        else:
            options += [flag, str(value)]
    return options


def load_recipe(path: Path) -> dict:
    recipe = load_yaml(path)
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(sorted(RECIPE_KEYS))}"
        )
    models = recipe.get("models")
    if not isinstance(models, list) or not models:
        raise UserError(f"{path}: 'models' must be a non-empty list")
    for k, model in enumerate(models):
        if not isinstance(model, dict) or set(model) - MODEL_KEYS or "name" not in model:
            raise UserError(
                f"{path}: models[{k}] needs a name and may have "
                f"{', '.join(sorted(MODEL_KEYS - {'name'}))}"
            )
    return recipe


def _run(command: list[str]) -> None:
    print(
        "$ " + " ".join(command[2:] if command[:2] == [sys.executable, "-m"] else command),
        flush=True,
    )
    if subprocess.run(command).returncode != 0:
        raise UserError(f"step failed: {' '.join(command[2:])} (its error is above)")


def _finished(run_dir: Path, epochs_wanted: int | None) -> bool:
    last = run_dir / "last.pt"
    if not (run_dir / "best.pt").is_file() or not last.is_file():
        return False
    state = torch.load(last, map_location="cpu", weights_only=True)
    return state["step"] == 0 and state["epoch"] >= (epochs_wanted or state["config"]["epochs"])


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
    parser.add_argument("--device", default="auto", help="passed to train and predict")
    parser.add_argument(
        "--fit-weights",
        action="store_true",
        help="fit the weights on out-of-fold predictions (overrides the config)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip finished runs and resume interrupted ones"
    )
    args = parser.parse_args(argv)
    recipe_path = find_config(args.config)
    recipe = load_recipe(recipe_path)
    folds = recipe.get("folds", [0])
    tta = recipe.get("tta", ["none"])
    fit = args.fit_weights or bool(recipe.get("fit_weights", False))
    read_dataset(args.data_dir)  # fail on bad data before the first compile
    python = [sys.executable, "-m"]

    predictions, oof_globs, weights = [], [], []
    for model in recipe["models"]:
        name = str(model["name"])
        overrides = _as_options(model.get("args", {}))
        epochs = model.get("args", {}).get("epochs")
        for fold in folds:
            run_name = f"{name}-fold{fold}"
            run_dir = args.out_dir / run_name
            command = [
                *python,
                "leaf_xla.train",
                "--data-dir",
                str(args.data_dir),
                "--out-dir",
                str(args.out_dir),
                "--run-name",
                run_name,
                "--fold",
                str(fold),
                "--device",
                args.device,
            ]
            train_config = {}
            if "config" in model:
                path = find_config(str(model["config"]))
                train_config = load_yaml(path)
                command += ["--config", str(path)]
            arch = model.get("args", {}).get("model") or train_config.get("model") or name
            command += ["--model", str(arch), *overrides, *extra]
            if args.resume and _finished(run_dir, epochs):
                print(f"{run_name}: finished, skipped")
                continue
            if args.resume and (run_dir / "last.pt").is_file():
                command.append("--resume")
            _run(command)
        out = args.out_dir / "predictions" / f"{name}.csv"
        checkpoints = [str(args.out_dir / f"{name}-fold{f}" / "best.pt") for f in folds]
        _run(
            [
                *python,
                "leaf_xla.predict",
                "--checkpoint",
                *checkpoints,
                "--data-dir",
                str(args.data_dir),
                "--out",
                str(out),
                "--tta",
                *tta,
                "--device",
                args.device,
                "--overwrite",
            ]
        )
        predictions.append(str(out))
        oof_globs.append(str(args.out_dir / f"{name}-fold*" / "oof.csv"))
        weights.append(str(float(model.get("weight", 1.0))))

    submission = args.out_dir / "submission.csv"
    command = [
        *python,
        "leaf_xla.ensemble",
        *predictions,
        "--data-dir",
        str(args.data_dir),
        "--out",
        str(submission),
        "--overwrite",
    ]
    command += ["--fit-weights", *oof_globs] if fit else ["--weights", *weights]
    _run(command)
    summarize(
        args.out_dir, args.data_dir, [str(m["name"]) for m in recipe["models"]], folds, submission
    )


def summarize(
    out_dir: Path, data_dir: Path, names: list[str], folds: list[int], submission: Path
) -> dict:
    """Validation AUC of each model and of the ensemble (its weights) on the shared folds."""
    data = read_dataset(data_dir)
    label_of = dict(zip(data.train.ids, data.train.targets))
    chosen = json.loads(submission.with_suffix(".json").read_text())["weights"]
    oofs = []
    for name in names:
        frames = [
            pd.read_csv(out_dir / f"{name}-fold{f}" / "oof.csv", dtype={"image_id": str})
            for f in folds
        ]
        oofs.append(pd.concat(frames).set_index("image_id")[data.classes])
    ids = oofs[0].index
    targets = np.stack([label_of[i] for i in ids])
    stack = np.stack([o.loc[ids].to_numpy() for o in oofs])
    weights = np.array([chosen[n] for n in names])
    summary = {
        "models": {n: mean_auc(targets, s) for n, s in zip(names, stack)},
        "ensemble": mean_auc(targets, np.tensordot(weights, stack, axes=1)),
        "weights": dict(zip(names, weights.tolist())),
        "validation_images": len(ids),
        "submission": str(submission),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    width = max(map(len, names + ["ensemble"]))
    print("\nvalidation mean column-wise ROC AUC")
    for name, auc in summary["models"].items():
        print(f"  {name:<{width}}  {auc:.4f}")
    print(f"  {'ensemble':<{width}}  {summary['ensemble']:.4f}")
    print(f"submission: {submission}")
    return summary


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
