"""The seed's recipe against the 1st place's, with tiny models on harder synthetic data.

    python bench/recipes.py [--seeds 0 1 2] [--signal 0.5] [--label-noise 0.1]

For each data seed: a synthetic Plant Pathology 2020 set whose spots are faded (`--signal`) and
a fraction of whose training labels is replaced by another class (`--label-noise`); the test
images' true labels go to a file outside the data folder, which no training command reads.
Then two recipes, each run with `python -m leaf_xla recipe` as a user would:

- seed-style: two tiny models (test_efficientnet, test_resnet) on fold 0 of 5, squashed square
  images, flips, flip TTA, their average;
- winner-style: one tiny model (test_resnet) on all 5 folds, then a distilled round on
  0.3 x out-of-fold + 0.7 x label, flip TTA, the average of both rounds, at the photos' aspect
  (`--winner-image-size`, default 32x48) with the strong augmentation preset
  (`--winner-augment-preset`).

Both train the same number of optimizer steps: 2 runs x `5 * --winner-epochs` epochs against
10 runs x `--winner-epochs`, with the same learning-rate curve over each run (the demo config's
warm-up / sustain / decay, stretched to the run's epochs). Prints the mean column-wise ROC AUC of
each submission (and of each member's test predictions) on the hidden test labels, per class,
with the mean and spread over the data seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from leaf_xla.metrics import column_auc
from leaf_xla.synth import PP2020_CLASSES, write_dataset

CLASSES = list(PP2020_CLASSES)
ALPHA = 0.3
DEMO_EPOCHS, DEMO_RAMP, DEMO_SUSTAIN, DEMO_DECAY = 10, 1.0, 2.0, 0.6  # the curve, stretched


def schedule(epochs: int) -> dict:
    """The demo's learning-rate curve over `epochs`: the same shape whatever the run length."""
    stretch = epochs / DEMO_EPOCHS
    return {
        "epochs": epochs,
        "ramp_epochs": DEMO_RAMP * stretch,
        "sustain_epochs": DEMO_SUSTAIN * stretch,
        "decay": DEMO_DECAY ** (1 / stretch),
        "n_folds": 5,
    }


def seed_recipe(epochs: int) -> dict:
    args = schedule(epochs)
    return {
        "folds": [0],
        "tta": ["none", "hflip", "vflip"],
        "models": [
            {"name": name, "config": "demo", "weight": 0.5, "args": {"model": name, **args}}
            for name in ("test_efficientnet", "test_resnet")
        ],
    }


def winner_recipe(epochs: int, image_size: str | None, augment_preset: str | None) -> dict:
    args = {"model": "test_resnet", **schedule(epochs)}
    if image_size:
        args["image_size"] = image_size
    if augment_preset:
        args["augment_preset"] = augment_preset
    return {
        "folds": [0, 1, 2, 3, 4],
        "tta": ["none", "hflip", "vflip"],
        "distill": {"alpha": ALPHA, "from": "winner"},
        "models": [{"name": "winner", "config": "demo", "args": args}],
    }


def run_recipe(config: dict, name: str, data: Path, work: Path, options: argparse.Namespace):
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = work / name
    command = [
        *(sys.executable, "-m", "leaf_xla", "recipe", "--config", str(path)),
        *("--data-dir", str(data), "--out-dir", str(out), "--device", options.device, "--resume"),
        *("--", "--workers", "2", "--log-every", "1000"),
    ]
    if not options.winner_image_size or name != "winner":
        command += ["--image-size", str(options.image_size)]
    log = work / f"{name}.log"
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{name} recipe failed (exit {code}); see {log}")
    return out


def optimizer_steps(out: Path) -> int:
    """Steps every run of a recipe took: train images of its fold // batch, times epochs."""
    folds = pd.read_csv(out / "folds.csv")["fold"]
    total = 0
    for history in out.glob("*-fold*/history.csv"):
        config = yaml.safe_load((history.parent / "config.yaml").read_text())
        per_epoch = int((folds != config["fold"]).sum()) // config["batch_size"]
        total += per_epoch * len(pd.read_csv(history))
    return total


def scores(path: Path, labels: pd.DataFrame) -> list[float]:
    """[mean, per class...] column-wise ROC AUC of a prediction CSV on the hidden labels."""
    probs = pd.read_csv(path).set_index("image_id").loc[labels.index, CLASSES]
    aucs = column_auc(labels.to_numpy(), probs.to_numpy())
    return [float(np.nanmean(aucs)), *map(float, aucs)]


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/ tests parse the lines they show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data seeds")
    parser.add_argument("--n-train", type=int, default=250)
    parser.add_argument("--n-test", type=int, default=150)
    parser.add_argument("--source-size", default="96x64", help="synthetic JPEG WxH")
    parser.add_argument("--signal", type=float, default=0.5, help="spot opacity")
    parser.add_argument("--label-noise", type=float, default=0.1, help="train labels flipped")
    parser.add_argument("--image-size", type=int, default=32, help="square training size")
    parser.add_argument("--winner-epochs", type=int, default=2, help="epochs of each winner run")
    parser.add_argument(
        "--winner-image-size", default="32x48", help="HxW for the winner: the aspect kept"
    )
    parser.add_argument("--winner-augment-preset", default="strong", help="seed or strong")
    parser.add_argument("--device", default="cpu", help="tiny models: plain CPU compiles nothing")
    parser.add_argument("--work", type=Path, default=Path("bench_recipes"))
    return parser


def main() -> None:
    parser = build_parser()
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    width, height = (int(v) for v in options.source_size.split("x"))
    recipes = {
        "seed": seed_recipe(5 * options.winner_epochs),
        "winner": winner_recipe(
            options.winner_epochs, options.winner_image_size, options.winner_augment_preset
        ),
    }
    rows: dict[str, list[list[float]]] = {}
    steps: dict[str, set[int]] = {}
    started = time.time()
    for seed in options.seeds:
        work = options.work / f"seed{seed}"
        data, hidden = work / "data", work / "test_labels.csv"
        if not hidden.is_file():
            write_dataset(
                data,
                options.n_train,
                options.n_test,
                seed=seed,
                size=(width, height),
                signal=options.signal,
                label_noise=options.label_noise,
                test_labels=hidden,
            )
        labels = pd.read_csv(hidden).set_index("image_id")[CLASSES]
        for name, config in recipes.items():
            out = run_recipe(config, name, data, work, options)
            steps.setdefault(name, set()).add(optimizer_steps(out))
            rows.setdefault(f"{name}-style submission", []).append(
                scores(out / "submission.csv", labels)
            )
            for member in sorted((out / "predictions").glob("*.csv")):
                rows.setdefault(f"{name}: {member.stem}", []).append(scores(member, labels))
        print(f"seed {seed} done ({time.time() - started:.0f} s)", flush=True)

    print(
        f"\n{len(options.seeds)} data seeds {options.seeds}; {options.n_train} train / "
        f"{options.n_test} test images, signal {options.signal}, label noise "
        f"{options.label_noise}; {options.image_size}px; optimizer steps per recipe: "
        + ", ".join(f"{n} {sorted(s)}" for n, s in steps.items())
        + f"; {time.time() - started:.0f} s\n"
    )
    header = ["test AUC (mean ± sd over seeds)", "mean", *CLASSES, "per seed"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, values in rows.items():
        table = np.array(values)
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(table.mean(0), table.std(0))]
        per_seed = " ".join(f"{v:.3f}" for v in table[:, 0])
        print(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
    results = {"options": {k: str(v) for k, v in vars(options).items()}, "rows": rows}
    (options.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
