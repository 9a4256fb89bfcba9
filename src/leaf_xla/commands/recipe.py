"""The whole job of an ensemble config: train every model on every listed fold, predict the test
set, ensemble, and print a summary. Each step is a subprocess running the same CLI a user would.

    leaf-xla recipe --config ensemble --data-dir data/plant-pathology-2020-fgvc7 \\
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
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands import train
from leaf_xla.commands.options import (
    add_launch_options,
    launch_options,
    launch_settings,
    parse_args,
    train_settings,
)
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.config import find_config, load_yaml
from leaf_xla.errors import SettingError, UserError
from leaf_xla.rundir import BEST, LAST, OOF
from leaf_xla.settings import check_data_dir, parse_image_size


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="leaf-xla recipe",
        usage="%(prog)s [--config YAML] --data-dir DIR --out-dir DIR [options] "
        "[-- TRAIN OPTIONS...]",
        description=__doc__,  # the ensemble YAML's keys and the `--` pass-through
    )
    parser.add_argument("--config", default="ensemble", help="ensemble YAML (or its name)")
    parser.add_argument("--data-dir", type=Path, required=True, help="competition folder")
    parser.add_argument("--out-dir", type=Path, required=True, help="runs, predictions, submission")
    add_launch_options(parser)  # passed to train and predict
    parser.add_argument(
        "--fit-weights",
        action="store_true",
        help="fit the weights on out-of-fold predictions (overrides the config)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip finished runs and resume interrupted ones"
    )
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the recipe's own options, the train options after `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    own, extra = split_argv(argv)
    args = build_parser().parse_args(own)
    try:
        train.build_parser().parse_args(extra)
    except UserError as err:
        raise UserError(f"the train options after --: {err}") from None
    args.extra = extra
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    check_data_dir(args.data_dir)
    from leaf_xla import recipe as library  # torch (through data): after the arguments
    from leaf_xla.data import read_dataset
    from leaf_xla.rundir import hold_lock

    # One recipe per output folder (its predictions and submission); each train locks its run.
    hold_lock(args.out_dir / ".recipe.lock", f"output folder {args.out_dir} (recipe)")
    recipe_path = find_config(args.config)
    recipe = library.load_recipe(recipe_path)
    fold_list = [int(f) for f in recipe.get("folds", [0])]
    runs = plan_runs(recipe["models"], fold_list, args, recipe_path)
    students, soft_csv = [], args.out_dir / "distill" / "soft_targets.csv"
    if "distill" in recipe:
        library.check_every_fold(recipe_path, recipe, runs, fold_list)
        distilled = library.distilled_models(recipe, soft_csv)
        students = plan_runs(distilled, fold_list, args, recipe_path)
    read_dataset(args.data_dir, need_test=True)  # fail on bad data before the first compile
    if not args.resume:
        started = [
            r.dir
            for r in runs + students
            if not r.settings.run.overwrite and any(r.dir.glob("*.pt"))
        ]
        if started:
            raise UserError(
                f"{started[0]} already holds checkpoints: pass --resume to skip finished runs "
                "and continue the others, or -- --overwrite to train them again"
            )
    run_all(args, recipe, runs, students, soft_csv)


def run_all(
    args: argparse.Namespace, recipe: dict, runs: list, students: list, soft_csv: Path
) -> None:
    """Train and predict every member, distil (when asked), ensemble and summarize."""
    from leaf_xla import recipe as library

    tta = [str(t) for t in recipe.get("tta", ["none"])]
    fit = args.fit_weights or bool(recipe.get("fit_weights", False))
    members = [train_and_predict(m, runs, args, tta) for m in recipe["models"]]
    if students:
        rewritten = library.write_soft_targets(recipe, runs, students, args.data_dir, fit, soft_csv)
        distilled = library.distilled_models(recipe, soft_csv)
        # Runs on targets just rewritten start again (with --overwrite: the old ones go aside).
        members += [
            train_and_predict(m, students, args, tta, resume=not rewritten) for m in distilled
        ]
    predictions, oofs, weights = (list(column) for column in zip(*members))
    submission = args.out_dir / "submission.csv"
    command = [
        *(sys.executable, "-m", "leaf_xla", "ensemble"),
        *predictions,
        *("--data-dir", str(args.data_dir), "--out", str(submission), "--overwrite"),
    ]
    command += ["--fit-weights", *oofs] if fit else ["--weights", *weights, "--oof", *oofs]
    command += ["--metric", runs[0].settings.data.metric]  # as train scored the runs
    _run(command)
    library.summarize(args.out_dir, runs + students, submission)


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
    recipe_path: Path | str = "recipe",
) -> list:
    """Every model x fold train command, parsed as train will parse it (bad options and folds
    fail here, naming the recipe file and the model, not after the first model has trained)."""
    runs = []
    for model in models:
        try:
            runs += _plan_model(model, fold_list, args)
        except UserError as err:
            said = err.as_flag() if isinstance(err, SettingError) else str(err)
            raise UserError(f"{recipe_path}: model {model['name']}: {said}") from None
    return runs


def _plan_model(model: dict, fold_list: list[int], args: argparse.Namespace) -> list:
    """One model's runs (see plan_runs)."""
    from leaf_xla.recipe import PlannedRun

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
            *launch_options(launch_settings(args)),
            *config_args,
            *("--model", str(arch)),
            *_as_options({k: v for k, v in overrides.items() if k != "model"}),
            *args.extra,
        ]
        settings = train_settings(parse_args(train.build_parser(), train_args))
        weights = settings.model.weights
        if weights and not Path(weights).is_file():
            raise UserError(
                f"weights file {weights} not found (e.g. convert Keras' ResNet152V2 file with "
                "leaf-xla convert_keras, see its config)"
            )
        folds = 1 if settings.data.holdout is not None else settings.data.n_folds
        if fold >= folds:
            split = (
                "a --holdout split (fold 0)" if folds == 1 else f"{folds} folds (0..{folds - 1})"
            )
            raise UserError(f"folds lists fold {fold}, but it trains with {split}")
        command = [sys.executable, "-m", "leaf_xla", "train", *train_args]
        runs.append(PlannedRun(name, fold, args.out_dir / run_name, command, settings))
    return runs


def train_and_predict(
    model: dict, runs: list, args: argparse.Namespace, tta: list[str], resume: bool = True
) -> tuple[str, str, str]:
    """Train a model's runs (resumed under --resume unless `resume` is false), predict the
    test set with them; (predictions CSV, its comma-separated OOF files, weight) for the
    ensemble."""
    name = str(model["name"])
    mine = [r for r in runs if r.model == name]
    for run in mine:
        # Train decides whether a run is finished, together with every other host (a pod's
        # hosts each read their own disk, and must not part ways here).
        resumed = resume and args.resume and (run.dir / LAST).is_file()
        _run(run.command + (["--resume"] if resumed else []))
    out = args.out_dir / "predictions" / f"{name}.csv"
    _run(
        [
            *(sys.executable, "-m", "leaf_xla", "predict"),
            "--checkpoint",
            *[str(r.dir / BEST) for r in mine],
            *("--data-dir", str(args.data_dir), "--out", str(out), "--tta", *tta),
            *launch_options(launch_settings(args)),
            "--overwrite",
        ]
    )
    oofs = ",".join(str(r.dir / OOF) for r in mine)
    return str(out), oofs, str(float(model.get("weight", 1.0)))
