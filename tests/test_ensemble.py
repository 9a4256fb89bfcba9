"""leaf_xla.ensemble: weighted averages aligned by id, fitted weights, checks, submission formats.

Pure pandas/numpy on small CSVs written to disk; the CLI runs as a subprocess like a user's.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image

from leaf_xla.ensemble_fit import combine, fast_mean_auc, fit_weights
from leaf_xla.errors import UserError
from leaf_xla.formats import format_submission
from leaf_xla.metrics import mean_auc

CLASSES = ["healthy", "multiple_diseases", "rust", "scab"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def write_predictions(
    path: Path, ids: list[str], probs: np.ndarray, seed: int | None = None
) -> Path:
    """A prediction CSV; rows shuffled when `seed` is given (alignment must be by id)."""
    frame = pd.DataFrame(probs, columns=CLASSES)
    frame.insert(0, "image_id", ids)
    if seed is not None:
        frame = frame.sample(frac=1, random_state=seed)
    frame.to_csv(path, index=False)
    return path


def write_data_dir(
    root: Path,
    test_ids: list[str],
    train_ids: list[str] = (),
    targets: np.ndarray | None = None,
) -> Path:
    """A competition folder: CSVs and one tiny JPEG for every image (the ensemble only needs
    them to be there)."""
    images = root / "images"
    images.mkdir(parents=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 160, 50)).save(jpeg, format="JPEG")
    for image_id in [*test_ids, *train_ids]:
        (images / f"{image_id}.jpg").write_bytes(jpeg.getvalue())
    pd.DataFrame({"image_id": test_ids}).to_csv(root / "test.csv", index=False)
    sample = pd.DataFrame({"image_id": test_ids, **{c: 0.25 for c in CLASSES}})
    sample.to_csv(root / "sample_submission.csv", index=False)
    if targets is not None:
        train = pd.DataFrame(targets.astype(int), columns=CLASSES)
        train.insert(0, "image_id", list(train_ids))
        train.to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture
def three(tmp_path: Path) -> tuple[Path, list[str], np.ndarray, list[Path]]:
    """A data folder of 12 test ids (sample order not sorted) and 3 shuffled prediction CSVs."""
    rng = np.random.default_rng(0)
    ids = [f"Test_{i}" for i in rng.permutation(12)]
    data = write_data_dir(tmp_path / "data", ids)
    probs = np.stack([softmax(rng.normal(size=(12, 4))) for _ in range(3)])
    paths = [write_predictions(tmp_path / f"m{k}.csv", ids, probs[k], k) for k in range(3)]
    return data, ids, probs, paths


def test_weighted_mean_aligned_by_id(three, tmp_path: Path) -> None:
    data, ids, probs, paths = three
    out = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla",
        "ensemble",
        *map(str, paths),
        *("--weights", "2", "1", "1", "--data-dir", str(data), "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    submission = pd.read_csv(out)
    assert list(submission.columns) == ["image_id", *CLASSES]
    assert submission["image_id"].tolist() == ids  # sample_submission's order
    expected = 0.5 * probs[0] + 0.25 * probs[1] + 0.25 * probs[2]
    np.testing.assert_allclose(submission[CLASSES].to_numpy(), expected, atol=1e-12)
    report = json.loads((tmp_path / "submission.json").read_text())
    assert report["weights"] == {"m0": 0.5, "m1": 0.25, "m2": 0.25}


def test_config_weights_by_model_name(three, tmp_path: Path) -> None:
    data, ids, probs, paths = three
    config = tmp_path / "mine.yaml"
    config.write_text(
        "models:\n  - {name: m2, weight: 1}\n  - {name: m0, weight: 3}\n  - {name: m1, weight: 0}\n"
    )
    out = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla",
        "ensemble",
        *map(str, paths),
        *("--config", str(config), "--data-dir", str(data), "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    submission = pd.read_csv(out).set_index("image_id").loc[ids]
    np.testing.assert_allclose(submission.to_numpy(), 0.75 * probs[0] + 0.25 * probs[2])


def test_rank_method(three, tmp_path: Path) -> None:
    data, ids, probs, paths = three
    out = tmp_path / "ranks.csv"
    result = run_cli(
        "leaf_xla",
        "ensemble",
        *map(str, paths),
        *("--method", "rank", "--data-dir", str(data), "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    # Per model and class: rank among the 12 rows (1 = lowest) / 12, then the plain mean.
    ranks = probs.argsort(axis=1).argsort(axis=1) + 1
    expected = ranks.mean(0) / 12
    submission = pd.read_csv(out).set_index("image_id").loc[ids]
    np.testing.assert_allclose(submission.to_numpy(), expected)


def test_fast_auc_equals_metric() -> None:
    rng = np.random.default_rng(1)
    targets = np.eye(4)[rng.integers(0, 4, 50)]
    targets[:, 1] = 0  # an undefined column is left out, as in metrics.mean_auc
    multi = (rng.uniform(size=(50, 4)) < 0.4).astype(float)
    scores = np.round(rng.uniform(size=(50, 4)), 1)  # many ties
    for t in (targets, multi):
        assert fast_mean_auc(t, scores) == pytest.approx(mean_auc(t, scores), abs=1e-12)


def noise_case(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two informative models with independent errors and one that is pure noise."""
    rng = np.random.default_rng(0)
    targets = np.eye(4)[rng.integers(0, 4, n)]
    good = [softmax(1.2 * targets + rng.normal(size=(n, 4))) for _ in range(2)]
    noise = softmax(rng.normal(size=(n, 4)))
    return np.stack([*good, noise]), targets


def test_fitted_weights_beat_single_models_and_equal_weights() -> None:
    stack, targets = noise_case()
    weights, cv = fit_weights(stack, targets)
    fitted = mean_auc(targets, combine(stack, weights, "mean"))
    singles = [mean_auc(targets, m) for m in stack]
    equal = mean_auc(targets, stack.mean(0))
    print(f"singles {np.round(singles, 4)} equal {equal:.4f} fitted {fitted:.4f} w {weights}")
    assert cv["kept"] == "fitted" and cv["heldout_score_fitted"] > cv["heldout_score_equal"]
    assert fitted >= max(singles) and fitted >= equal
    assert weights[2] < 0.1 and weights.sum() == pytest.approx(1) and (weights >= 0).all()


def test_fit_weights_cli_report_and_roc_png(tmp_path: Path) -> None:
    stack, targets = noise_case()
    train_ids = [f"Train_{i}" for i in range(len(targets))]
    test_ids = [f"Test_{i}" for i in range(10)]
    data = write_data_dir(tmp_path / "data", test_ids, train_ids, targets)
    rng = np.random.default_rng(2)
    tests, oofs = [], []
    for k, name in enumerate(["good_a", "good_b", "noise"]):
        tests.append(
            write_predictions(tmp_path / f"{name}.csv", test_ids, rng.dirichlet([1] * 4, 10))
        )
        for fold, rows in enumerate((slice(0, 200), slice(200, None))):
            (tmp_path / f"{name}-fold{fold}").mkdir()
            write_predictions(
                tmp_path / f"{name}-fold{fold}" / "oof.csv", train_ids[rows], stack[k, rows], k
            )
        oofs.append(str(tmp_path / f"{name}-fold*" / "oof.csv"))
    out = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla",
        "ensemble",
        *map(str, tests),
        *("--fit-weights", *oofs, "--data-dir", str(data), "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "submission.json").read_text())
    oof = report["oof"]
    assert oof["rows"] == 400 and report["weights_from"] == "fitted"
    assert set(oof["per_model"]) == {"good_a", "good_b", "noise"}
    assert set(oof["per_model"]["noise"]["per_class"]) == set(CLASSES)
    assert oof["ensemble"]["auc"] >= max(m["auc"] for m in oof["per_model"].values())
    assert report["weights"]["noise"] < 0.1
    assert (tmp_path / "submission_roc.png").read_bytes()[:4] == b"\x89PNG"
    for name in ["good_a", "noise", "ensemble", *CLASSES]:  # the per-class table
        assert name in result.stdout


def test_oof_scores_given_weights(three, tmp_path: Path) -> None:
    """--oof reports AUCs for the given weights without changing them."""
    stack, targets = noise_case(40)
    train_ids = [f"Train_{i}" for i in range(40)]
    test_ids = [f"Test_{i}" for i in range(5)]
    data = write_data_dir(tmp_path / "oofdata", test_ids, train_ids, targets)
    tests = [write_predictions(tmp_path / f"t{k}.csv", test_ids, stack[k, :5]) for k in range(3)]
    oofs = [write_predictions(tmp_path / f"o{k}.csv", train_ids, stack[k], k) for k in range(3)]
    out = tmp_path / "given.csv"
    result = run_cli(
        "leaf_xla",
        "ensemble",
        *map(str, tests),
        *("--weights", "1", "1", "2", "--oof", *map(str, oofs)),
        *("--data-dir", str(data), "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "given.json").read_text())
    assert report["weights"] == {"t0": 0.25, "t1": 0.25, "t2": 0.5}
    ensemble = combine(stack, np.array([0.25, 0.25, 0.5]), "mean")
    assert report["oof"]["ensemble"]["auc"] == pytest.approx(mean_auc(targets, ensemble))


def _edit(path: Path, change) -> None:
    frame = pd.read_csv(path, dtype={"image_id": str})
    change(frame).to_csv(path, index=False)


BAD_INPUTS = {
    # case: (how the last CSV is spoiled, extra options, fragments of the error)
    "missing id": (lambda f: f[f.image_id != "Test_3"], [], ["m2.csv", "lacks ids Test_3"]),
    "extra id": (
        lambda f: pd.concat([f, f.head(1).assign(image_id="Test_99")]),
        [],
        ["m2.csv", "Test_99"],
    ),
    "duplicate id": (lambda f: pd.concat([f, f.head(1)]), [], ["m2.csv", "duplicate image ids"]),
    "other columns": (
        lambda f: f.rename(columns={"scab": "blight"}),
        [],
        ["m2.csv", "class columns", "blight"],
    ),
    "nan": (
        lambda f: f.assign(rust=np.where(f.image_id == "Test_4", np.nan, f.rust)),
        [],
        ["m2.csv", "non-finite", "Test_4"],
    ),
    "inf": (
        lambda f: f.assign(rust=np.where(f.image_id == "Test_5", np.inf, f.rust)),
        [],
        ["m2.csv", "non-finite", "Test_5"],
    ),
    "text": (
        lambda f: f.assign(scab=np.where(f.image_id == "Test_6", "high", f.scab)),
        [],
        ["m2.csv", "non-numeric", "Test_6"],
    ),
    "weights count": (lambda f: f, ["--weights", "1", "2"], ["--weights", "2 weights for 3"]),
    "negative weight": (lambda f: f, ["--weights", "1", "-1", "1"], ["non-negative"]),
    "nan weight": (lambda f: f, ["--weights", "1", "nan", "1"], ["finite"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_user_errors(three, tmp_path: Path, case: str) -> None:
    data, _, _, paths = three
    spoil, options, fragments = BAD_INPUTS[case]
    _edit(paths[2], spoil)
    out = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla",
        "ensemble",
        *map(str, paths),
        *options,
        *("--data-dir", str(data), "--out", str(out)),
    )
    assert_user_error(result, *fragments)
    assert not out.exists()


def test_missing_file(three, tmp_path: Path) -> None:
    data, _, _, paths = three
    result = run_cli(
        "leaf_xla",
        "ensemble",
        str(paths[0]),
        str(tmp_path / "nope.csv"),
        "--out",
        str(tmp_path / "x.csv"),
    )
    assert_user_error(result, "nope.csv", "not found")


def test_existing_out_is_left_alone(three, tmp_path: Path) -> None:
    data, _, _, paths = three
    out = tmp_path / "submission.csv"
    out.write_text("keep me\n")
    result = run_cli("leaf_xla", "ensemble", *map(str, paths), "--out", str(out))
    assert_user_error(result, str(out), "--overwrite")
    assert out.read_text() == "keep me\n"
    result = run_cli("leaf_xla", "ensemble", *map(str, paths), "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(out)) == 12


def test_submission_must_match_sample(three, tmp_path: Path) -> None:
    """Predictions that agree with each other but not with the competition's test ids."""
    data, ids, probs, _ = three
    other = [i.replace("Test_", "Old_") for i in ids]
    paths = [write_predictions(tmp_path / f"old{k}.csv", other, probs[k]) for k in range(2)]
    out = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla", "ensemble", *map(str, paths), "--data-dir", str(data), "--out", str(out)
    )
    assert_user_error(result, "sample_submission.csv", "lack ids Test_")
    assert not out.exists()


def _probs(ids: list[str], rows: list[list[float]], classes: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, index=pd.Index(ids, name="image_id"), columns=classes)


def test_format_multilabel_submission() -> None:
    """Plant Pathology 2021: `image,labels`, labels over the threshold (at least the top one)."""
    classes = ["complex", "healthy", "rust", "scab"]
    probs = _probs(["b.jpg", "a.jpg"], [[0.1, 0.2, 0.7, 0.6], [0.1, 0.3, 0.2, 0.1]], classes)
    sample = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "labels": "healthy"})
    out = format_submission(probs, sample, Path("sample_submission.csv"), threshold=0.5)
    assert out.to_dict("list") == {"image": ["a.jpg", "b.jpg"], "labels": ["healthy", "rust scab"]}


def test_format_integer_submission() -> None:
    """Cassava: `image_id,label`, the class number of the highest probability."""
    probs = _probs(
        ["2.jpg", "1.jpg"], [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], ["CBB", "CMD", "Healthy"]
    )
    sample = pd.DataFrame({"image_id": ["1.jpg", "2.jpg"], "label": 4})
    out = format_submission(probs, sample, Path("sample_submission.csv"))
    assert out.to_dict("list") == {"image_id": ["1.jpg", "2.jpg"], "label": [0, 2]}


def test_format_follows_sample_columns_and_rejects_others() -> None:
    probs = _probs(["x"], [[0.1, 0.2, 0.3, 0.4]], CLASSES)
    sample = pd.DataFrame({"image_id": ["x"], **{c: 0.25 for c in reversed(CLASSES)}})
    out = format_submission(probs, sample, Path("s.csv"))
    assert list(out.columns) == ["image_id", *reversed(CLASSES)]
    assert out["scab"].item() == 0.4
    with pytest.raises(UserError, match="neither the classes"):
        format_submission(probs, sample.rename(columns={"rust": "blight"}), Path("s.csv"))


def _two_members(tmp_path: Path, good: np.ndarray, bad: np.ndarray, targets: np.ndarray):
    """A data folder and, per member, test predictions and out-of-fold predictions."""
    train_ids = [f"Train_{i}" for i in range(len(targets))]
    test_ids = [f"Test_{i}" for i in range(6)]
    data = write_data_dir(tmp_path / "data", test_ids, train_ids, targets)
    tests, oofs = [], []
    for name, probs in (("good", good), ("bad", bad)):
        tests.append(write_predictions(tmp_path / f"{name}.csv", test_ids, probs[:6]))
        oofs.append(str(write_predictions(tmp_path / f"{name}_oof.csv", train_ids, probs, 1)))
    return data, tests, oofs


def test_an_ensemble_below_its_best_member_says_so_and_what_helps(tmp_path: Path) -> None:
    """Issue 22.5: a member that never learned drags the average down: the end of the output
    names it, the score without it, and what --fit-weights would give."""
    rng = np.random.default_rng(3)
    targets = np.eye(4)[rng.integers(0, 4, 200)]
    good = softmax(1.5 * targets + rng.normal(size=(200, 4)))
    bad = softmax(3 * rng.normal(size=(200, 4)))  # never learned: confident noise
    data, tests, oofs = _two_members(tmp_path, good, bad, targets)
    result = run_cli(
        "leaf_xla", "ensemble", *map(str, tests), "--oof", *oofs, "--data-dir", str(data),
        "--out", str(tmp_path / "submission.csv"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "submission.json").read_text())
    scores = {n: s["score"] for n, s in report["oof"]["per_model"].items()}
    ensemble = report["oof"]["ensemble"]["score"]
    assert report["metric"] == "auc" and scores["good"] == pytest.approx(mean_auc(targets, good))
    assert ensemble < scores["good"]
    tail = result.stdout.splitlines()[-4:]
    assert tail[0] == (
        f"warning: the ensemble's out-of-fold auc {ensemble:.4f} is below its best member's "
        f"(good {scores['good']:.4f})"
    ), result.stdout
    assert tail[1].startswith(f"warning: bad is near chance: out-of-fold auc {scores['bad']:.4f}")
    assert tail[2] == (
        f"warning: without bad the ensemble's out-of-fold auc is {scores['good']:.4f} "
        f"({scores['good'] - ensemble:+.4f}): leave it out of the ensemble"
    )
    assert tail[3].startswith("warning: --fit-weights would give good 0.")
    assert report["warnings"] == [line.removeprefix("warning: ") for line in tail]

    # Two good members: not a word.
    other = softmax(1.5 * targets + rng.normal(size=(200, 4)))
    data, tests, oofs = _two_members(tmp_path / "fine", good, other, targets)
    result = run_cli(
        "leaf_xla", "ensemble", *map(str, tests), "--oof", *oofs, "--data-dir", str(data),
        "--out", str(tmp_path / "fine.csv"),
    )  # fmt: skip
    assert result.returncode == 0 and "warning" not in result.stdout, result.stdout


def test_multilabel_ensemble_scores_mean_f1_at_the_out_of_fold_threshold(tmp_path: Path) -> None:
    """Issue 22.2, Plant Pathology 2021: the OOF table is headed by the mean F1 over images, the
    decision threshold is the best one out of fold, and the submission is written with it."""
    classes = ["healthy", "rust", "scab"]
    rng = np.random.default_rng(4)
    n = 60
    targets = np.eye(3)[rng.integers(0, 3, n)]
    targets[:10, 1:] = 1  # rust and scab together
    targets[:10, 0] = 0
    # Under-confident: true labels near 0.35, others near 0.1, so 0.5 would keep only the top.
    probs = np.clip(0.1 + 0.25 * targets + rng.normal(0, 0.04, (n, 3)), 0.01, 0.99)
    root = tmp_path / "data"
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    train_ids = [f"t{i}.jpg" for i in range(n)]
    test_ids = [f"q{i}.jpg" for i in range(n)]
    for folder, ids in (("train_images", train_ids), ("test_images", test_ids)):
        for image_id in ids:
            (root / folder / image_id).write_bytes(jpeg.getvalue())
    names = np.asarray(classes)
    labels = [" ".join(names[row > 0]) for row in targets]
    pd.DataFrame({"image": train_ids, "labels": labels}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image": test_ids, "labels": "healthy"}).to_csv(
        root / "sample_submission.csv", index=False
    )
    for name, ids in (("test", test_ids), ("oof", train_ids)):
        frame = pd.DataFrame(probs, columns=classes)
        frame.insert(0, "image", ids)
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    out = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla", "ensemble", str(tmp_path / "test.csv"), "--oof", str(tmp_path / "oof.csv"),
        "--data-dir", str(root), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "submission.json").read_text())
    from sklearn.metrics import f1_score

    def f1(threshold: float) -> float:
        sets = (probs >= threshold) | (probs == probs.max(1, keepdims=True))
        return f1_score(targets.astype(int), sets.astype(int), average="samples")

    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    best = grid[int(np.argmax([f1(t) for t in grid]))]
    assert report["metric"] == "f1_samples" and report["threshold"] == pytest.approx(best)
    assert best < 0.5 and f1(best) > f1(0.5)
    assert report["oof"]["ensemble"]["score"] == pytest.approx(f1(best))
    assert "OOF mean F1 over images, and ROC AUC (60 rows)" in result.stdout
    assert f"decision threshold {best:.2f} (best out-of-fold mean F1 over images)" in result.stdout
    written = pd.read_csv(out)
    chosen = (probs >= best) | (probs == probs.max(1, keepdims=True))
    assert written["labels"].tolist() == [" ".join(names[row]) for row in chosen]
