"""leaf_xla.recipe end to end (train -> predict -> ensemble) on a tiny set, and its --resume.

The recipe runs on the plain CPU device to stay quick: the XLA paths of train and predict have
their own tests, and the recipe only passes --device on.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, run_cli

from leaf_xla.errors import UserError
from leaf_xla.recipe import PlannedRun, load_recipe
from leaf_xla.settings import DataSettings, ModelSettings, TrainSettings

CLASSES = ["healthy", "multiple_diseases", "rust", "scab"]
RECIPE = """\
folds: [0]
tta: [none, hflip]
models:
  - name: a
    config: demo
    weight: 3
    args: {model: test_resnet}
  - name: b
    config: demo
    weight: 1
    args: {model: test_resnet, seed: 1}
"""


def recipe(config: Path, data: Path, out: Path, *options: str):
    return run_cli(
        "leaf_xla",
        "recipe",
        *("--config", str(config), "--data-dir", str(data), "--out-dir", str(out)),
        *("--device", "cpu", *options, "--", "--epochs", "1", "--image-size", "32"),
    )


def test_recipe_end_to_end_and_resume(pp2020: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(RECIPE)
    out = tmp_path / "runs"
    first = recipe(config, pp2020, out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]

    submission = pd.read_csv(out / "submission.csv")
    test_ids = pd.read_csv(pp2020 / "test.csv")["image_id"].tolist()
    assert list(submission.columns) == ["image_id", *CLASSES]
    assert submission["image_id"].tolist() == test_ids
    values = submission[CLASSES].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(values.sum(1), 1, atol=1e-5)
    a, b = (pd.read_csv(out / "predictions" / f"{n}.csv")[CLASSES].to_numpy() for n in "ab")
    np.testing.assert_allclose(values, 0.75 * a + 0.25 * b, atol=1e-6)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"] == {"a": 0.75, "b": 0.25}
    assert set(summary["models"]) == {"a", "b"} and 0 <= summary["ensemble"] <= 1
    assert set(summary["runs"]) == {"a-fold0", "b-fold0"}
    assert summary["validation_images"] == 16  # fold 0 of the demo config's 4
    assert (out / "submission_roc.png").is_file()

    # Without --resume the finished runs are not touched.
    again = recipe(config, pp2020, out)
    assert_user_error(again, "a-fold0", "--resume")

    # b as if killed before its first epoch ended: resumed, while train finds a finished (train
    # decides, so that the hosts of a pod decide together); the weights are fitted this time.
    state = torch.load(out / "b-fold0" / "last.pt", map_location="cpu", weights_only=True)
    state.update(epoch=0, step=0, history=[], best_score=-math.inf, flat_epochs=0)
    torch.save(state, out / "b-fold0" / "last.pt")
    resumed = recipe(config, pp2020, out, "--resume", "--fit-weights")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"nothing to resume: {out / 'a-fold0'} is finished" in resumed.stdout
    trains = [line for line in resumed.stdout.splitlines() if line.startswith("$ leaf_xla train")]
    assert len(trains) == 2 and all(t.endswith("--resume") for t in trains)
    assert "a-fold0" in trains[0] and "b-fold0" in trains[1]
    assert "resuming" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["b-fold0"]["epochs"] == 1
    assert summary["weights_from"] in ("fitted", "equal: fitted weights overfit")
    assert sum(summary["weights"].values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("models: []", "non-empty list"),
        ("epochs: 3\nmodels: [{name: a}]", "unknown key 'epochs'"),
        ("fold: [1]\nmodels: [{name: a}]", "unknown key 'fold' (did you mean 'folds'?"),
        (
            "models: [{name: a, wieght: 2}]",
            "models[0] unknown key 'wieght' (did you mean 'weight'?",
        ),
        ("models: [{model: a}]", "models[0] unknown key 'model' (the timm model goes in args"),
        ("models: [{name: a}]\ndistill: {alpha: 0.3, form: a}", "unknown key 'form' (did you"),
        ("folds: 0\nmodels: [{name: a}]", "'folds' must be a list"),
        ("tta: [rotate]\nmodels: [{name: a}]", "'tta' must be a list of"),
        ("models: [{name: a, weight: heavy}]", "weight must be a number"),
        ("models: [{name: a}, {name: a}]", "model names must differ"),
        ("models: [{name: a, args: [x]}]", "args must be a mapping"),
    ],
)
def test_bad_recipe_configs(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_recipe(path)


def test_missing_weights_file_fails_before_any_training(pp2020: Path, tmp_path: Path) -> None:
    """The shipped ensemble needs converted Keras weights for its ResNet: say so up front,
    not after the EfficientNets have trained for hours."""
    result = run_cli(
        "leaf_xla",
        "recipe",
        "--config",
        "ensemble",
        "--data-dir",
        str(pp2020),
        "--out-dir",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    assert_user_error(
        result, "keras_resnet152v2", "resnet152v2_imagenet.safetensors", "convert_keras"
    )
    assert not (tmp_path / "runs" / "tf_efficientnet_b7-fold0").exists()


def test_recipe_checks_tta_names_without_the_engine() -> None:
    code = "import sys, leaf_xla.recipe; assert 'leaf_xla.engine' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


DISTILL_RECIPE = """\
folds: [0, 1]
tta: [none, hflip]
distill: {alpha: 0.3, from: a, weight: 2}
models:
  - name: a
    config: demo
    args: {model: test_resnet, n_folds: 2}
"""


@pytest.mark.slow
def test_distill_end_to_end_targets_folds_submission_and_resume(
    pp2020: Path, tmp_path: Path
) -> None:
    from leaf_xla.data import read_dataset
    from leaf_xla.ensemble import read_predictions
    from leaf_xla.soft_targets import digest, read_soft_targets

    config = tmp_path / "distill.yaml"
    config.write_text(DISTILL_RECIPE)
    out = tmp_path / "runs"
    first = recipe(config, pp2020, out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]

    # Every training image's target is 0.3 x the OOF prediction of the run whose fold held
    # it out (never a model trained on it) + 0.7 x its label, exactly.
    data = read_dataset(pp2020)
    fold_of = pd.read_csv(out / "folds.csv").set_index("image_id")["fold"]
    soft_csv = out / "distill" / "soft_targets.csv"
    soft = pd.read_csv(soft_csv).set_index("image_id")
    assert soft.index.tolist() == data.train.ids
    oof = {k: read_predictions(out / f"a-fold{k}" / "oof.csv", CLASSES) for k in (0, 1)}
    for image_id, label in zip(data.train.ids, data.train.targets):
        k = fold_of[image_id]
        assert image_id not in oof[1 - k].index  # the other fold's model trained on it
        expected = 0.3 * oof[k].loc[image_id].to_numpy() + 0.7 * label.astype(np.float64)
        assert (soft.loc[image_id, CLASSES].to_numpy() == expected).all(), image_id

    # The distilled members trained on exactly those rows (their resume identity's digest).
    rows = read_soft_targets(
        soft_csv, train_ids=data.train.ids, needed=[], classes=CLASSES, multilabel=False
    )
    for k in (0, 1):
        state = torch.load(out / f"a-distill-fold{k}" / "last.pt", weights_only=True)
        trained = [i for i in data.train.ids if fold_of[i] != k]
        assert state["resume_identity"]["soft_targets"] == digest(rows, trained)
        assert state["config"]["soft_targets"] == str(soft_csv)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"a-fold0", "a-fold1", "a-distill-fold0", "a-distill-fold1"}
    assert summary["weights"] == {"a": pytest.approx(1 / 3), "a-distill": pytest.approx(2 / 3)}
    assert summary["validation_images"] == 64  # every image, out of fold
    a, d = (pd.read_csv(out / "predictions" / f"{n}.csv")[CLASSES] for n in ("a", "a-distill"))
    values = pd.read_csv(out / "submission.csv")[CLASSES].to_numpy()
    np.testing.assert_allclose(values, (a.to_numpy() + 2 * d.to_numpy()) / 3, atol=1e-6)

    # Resumed: every run finished, the soft targets kept (their bytes checked), not rewritten.
    before = soft_csv.stat().st_mtime_ns
    resumed = recipe(config, pp2020, out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("nothing to resume") == 4
    assert f"soft targets: {soft_csv} is up to date" in resumed.stdout
    assert soft_csv.stat().st_mtime_ns == before
    # Targets that the first round does not give are refused, not trained on.
    soft_csv.write_text(soft_csv.read_text().replace("0.7", "0.6", 1))
    changed = recipe(config, pp2020, out, "--resume")
    assert_user_error(changed, str(soft_csv), "differs from the targets", "--resume -- --overwrite")
    # The advice works: the distilled members train again from the start, on the new targets;
    # the first round's finished runs are kept.
    advised = run_cli(
        "leaf_xla",
        "recipe",
        *("--config", str(config), "--data-dir", str(pp2020), "--out-dir", str(out)),
        *("--device", "cpu", "--resume", "--", "--epochs", "1", "--image-size", "32"),
        "--overwrite",
    )
    assert advised.returncode == 0, advised.stdout[-2000:] + advised.stderr[-3000:]
    assert advised.stdout.count("nothing to resume") == 2
    assert f"soft targets: wrote {soft_csv}" in advised.stdout
    for k in (0, 1):
        state = torch.load(out / f"a-distill-fold{k}" / "last.pt", weights_only=True)
        trained = [i for i in data.train.ids if fold_of[i] != k]
        assert state["resume_identity"]["soft_targets"] == digest(rows, trained)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("folds: [0]\ndistill: {alpha: 0.3}\nmodels: [{name: a, config: demo}]", "folds [0]"),
        (
            "folds: [0, 1, 2, 3]\ndistill: {alpha: 0.3, from: b}\n"
            "models: [{name: a, config: demo}, {name: b, config: demo, args: {n_folds: 5}}]",
            "every fold of b must train",
        ),
        (
            "folds: [0]\ndistill: {alpha: 0.3}\n"
            "models: [{name: a, config: demo, args: {holdout: 0.2}}]",
            "not a --holdout split",
        ),
    ],
)
def test_distill_refuses_without_every_fold(
    pp2020: Path, tmp_path: Path, text: str, fragment: str
) -> None:
    config = tmp_path / "distill.yaml"
    config.write_text(text)
    result = recipe(config, pp2020, tmp_path / "runs")
    assert_user_error(result, "out-of-fold prediction for every training image", fragment)
    assert not list((tmp_path / "runs").glob("*-fold*"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("distill: 0.3\nmodels: [{name: a}]", "distill needs alpha"),
        ("distill: {alpha: 0}\nmodels: [{name: a}]", "alpha must be a number in (0, 1]"),
        ("distill: {alpha: 0.3, from: c}\nmodels: [{name: a}]", "from must be ensemble"),
        ("distill: {alpha: 0.3, members: [c]}\nmodels: [{name: a}]", "members must be a list"),
        ("distill: {alpha: 0.3, weight: -1}\nmodels: [{name: a}]", "weight must be a number"),
        ("distill: {alpha: 0.3}\nmodels: [{name: a}, {name: a-distill}]", "named a-distill"),
    ],
)
def test_bad_distill_configs(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_recipe(path)


def fake_first_round(pp2020: Path, out: Path, names: list[str], n_folds: int = 2):
    """Round-1 run folders as train leaves them (folds.csv, oof.csv of each fold's held-out
    images, random probabilities), without training: (runs, folds)."""
    from leaf_xla.data import read_dataset
    from leaf_xla.folds import load_or_create

    data = read_dataset(pp2020)
    fold_of = load_or_create(out / "folds.csv", data.train.ids, data.train.targets, n_folds, 42)
    rng = np.random.default_rng(0)
    runs = []
    for name in names:
        for k in range(n_folds):
            settings = TrainSettings(
                data=DataSettings(data_dir=pp2020, out_dir=out, n_folds=n_folds),
                model=ModelSettings(model="test_resnet"),
            )
            run = PlannedRun(name, k, out / f"{name}-fold{k}", [], settings)
            held_out = [i for i, f in zip(data.train.ids, fold_of) if f == k]
            probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(held_out))
            frame = pd.DataFrame(probs, columns=CLASSES)
            frame.insert(0, "image_id", held_out)
            run.dir.mkdir(parents=True)
            frame.to_csv(run.dir / "oof.csv", index=False)
            runs.append(run)
    return runs, pd.Series(fold_of, index=data.train.ids)


def test_out_of_fold_rows_come_from_the_fold_that_held_each_image_out(
    pp2020: Path, tmp_path: Path
) -> None:
    from leaf_xla.data import read_dataset
    from leaf_xla.ensemble import read_predictions
    from leaf_xla.recipe import out_of_fold

    runs, fold_of = fake_first_round(pp2020, tmp_path, ["a"])
    data = read_dataset(pp2020)
    oof = out_of_fold(runs, data)
    for row, image_id in zip(oof, data.train.ids):
        held_out_by = runs[fold_of[image_id]]
        assert held_out_by.fold == fold_of[image_id]
        own = read_predictions(held_out_by.dir / "oof.csv", CLASSES).loc[image_id].to_numpy()
        np.testing.assert_array_equal(row, own)

    # An oof.csv holding an image its model trained on (one of the other fold's) is refused.
    path = runs[0].dir / "oof.csv"
    frame = pd.read_csv(path)
    trained_on = fold_of.index[fold_of == 1][0]
    frame.loc[0, "image_id"] = trained_on
    frame.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"a-fold0/oof.csv: its images are not fold 0's"):
        out_of_fold(runs, data)


def test_soft_targets_from_the_ensemble_use_its_weights(pp2020: Path, tmp_path: Path) -> None:
    from leaf_xla.data import read_dataset
    from leaf_xla.recipe import out_of_fold, write_soft_targets

    runs, _ = fake_first_round(pp2020, tmp_path, ["a", "b"])
    data = read_dataset(pp2020)
    models = [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]
    recipe_dict = {"models": models, "distill": {"alpha": 0.5}}
    path = tmp_path / "distill" / "soft_targets.csv"
    write_soft_targets(recipe_dict, runs, [], pp2020, False, path)
    a, b = out_of_fold(runs[:2], data), out_of_fold(runs[2:], data)
    teacher = 0.75 * a + 0.25 * b
    soft = pd.read_csv(path)[CLASSES].to_numpy()
    np.testing.assert_allclose(soft, 0.5 * teacher + 0.5 * data.train.targets, rtol=0, atol=1e-12)
    np.testing.assert_allclose(soft.sum(1), 1, atol=1e-9)


def test_winner_recipe_plans_every_fold_and_its_distilled_round(tmp_path: Path) -> None:
    from leaf_xla.commands.recipe import parse, plan_runs
    from leaf_xla.config import find_config
    from leaf_xla.recipe import check_every_fold, distilled_models

    path = find_config("pp2020_winner")
    config = load_recipe(path)
    args = parse(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")])
    runs = plan_runs(config["models"], config["folds"], args)
    check_every_fold(path, config, runs, config["folds"])  # distillation is allowed
    soft = tmp_path / "soft.csv"
    students = plan_runs(distilled_models(config, soft), config["folds"], args)
    assert [r.dir.name for r in students] == [
        f"seresnext50_32x4d-distill-fold{k}" for k in range(5)
    ]
    for run in runs + students:
        assert run.settings.model.model == "seresnext50_32x4d" and run.settings.data.n_folds == 5
        assert run.settings.model.pretrained_tag == "racm_in1k"
        assert run.settings.augment.vflip == 0.5
    assert all(r.settings.data.soft_targets == soft for r in students)
    assert config["distill"]["alpha"] == 0.3 and config["tta"] == ["none", "hflip", "vflip"]


def test_recipe_options_and_folds_are_checked_before_anything_trains(
    pp2020: Path, tmp_path: Path
) -> None:
    """A typo inside a model's args, a fold the folds file cannot have, a typo after `--`:
    each is one line naming the recipe file and the model, before any training."""
    config, out = tmp_path / "typo.yaml", tmp_path / "runs"
    b_args = "{model: test_resnet, image_szie: 48}"
    config.write_text(RECIPE.replace("{model: test_resnet, seed: 1}", b_args))
    result = recipe(config, pp2020, out)
    assert_user_error(
        result, f"{config}: model b: unknown option --image-szie; did you mean --image-size?"
    )
    config.write_text(RECIPE.replace("folds: [0]", "folds: [0, 7]"))
    result = recipe(config, pp2020, out)
    assert_user_error(result, f"{config}: model a: folds lists fold 7", "4 folds (0..3)")
    config.write_text(RECIPE)
    result = run_cli(
        *("leaf_xla", "recipe", "--config", str(config), "--data-dir", str(pp2020)),
        *("--out-dir", str(out), "--", "--epohcs", "1"),
    )
    assert_user_error(result, "train options after --: unknown option --epohcs; did you mean")
    assert not list(out.glob("*/*.pt")) and "$ " not in result.stdout


def test_recipe_summary_ends_with_what_is_wrong_with_the_ensemble(tmp_path: Path, capsys) -> None:
    """Issue 22.5: the recipe's last lines repeat the ensemble's warnings (a member near chance,
    the ensemble below its best member), and summary.json holds the metric's scores."""
    from test_ensemble import softmax, write_data_dir, write_predictions

    from leaf_xla.recipe import summarize

    rng = np.random.default_rng(5)
    targets = np.eye(4)[rng.integers(0, 4, 120)]
    members = {
        "good": softmax(1.5 * targets + rng.normal(size=(120, 4))),
        "bad": softmax(3 * rng.normal(size=(120, 4))),
    }
    train_ids = [f"Train_{i}" for i in range(120)]
    data = write_data_dir(tmp_path / "data", ["Test_0", "Test_1"], train_ids, targets)
    runs, tests, oofs = [], [], []
    for name, probs in members.items():
        run_dir = tmp_path / f"{name}-fold0"
        run_dir.mkdir()
        pd.DataFrame({"epoch": [0], "val_loss": [1.0], "val_auc": [0.6]}).to_csv(
            run_dir / "history.csv", index=False
        )
        oofs.append(str(write_predictions(run_dir / "oof.csv", train_ids, probs)))
        tests.append(
            str(write_predictions(tmp_path / f"{name}.csv", ["Test_0", "Test_1"], probs[:2]))
        )
        runs.append(PlannedRun(name, 0, run_dir, [], None))
    submission = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla", "ensemble", *tests, "--oof", *oofs, "--data-dir", str(data),
        "--out", str(submission),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = summarize(tmp_path, runs, submission)
    printed = capsys.readouterr().out.splitlines()
    assert summary["metric"] == "auc" and summary["runs"]["good-fold0"]["best_val_auc"] == 0.6
    assert summary["ensemble"] < summary["models"]["good"]
    warnings = summary["warnings"]
    assert len(warnings) == 4 and "below its best member's (good" in warnings[0]
    assert warnings[1].startswith("bad is near chance")
    assert printed[-5:-1] == [f"warning: {line}" for line in warnings]
    assert printed[-1].startswith(f"submission: {submission}")
