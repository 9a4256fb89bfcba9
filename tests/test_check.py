"""Broken data, one real broken file or CSV row per kind: what `check` reports, and that
`train` stops with one line naming the offenders before it builds a model.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image

from leaf_xla import synth
from leaf_xla.data import Problems, decode, read_dataset, scan, verify_images
from leaf_xla.errors import UserError


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def save_as(path: Path, mode: str, fmt: str = "JPEG") -> None:
    with Image.open(path) as image:
        converted = image.convert(mode)
    converted.save(path, fmt)


def corrupt_inside(path: Path) -> None:
    """A JPEG start and end with noise between: only decoding tells it is not an image."""
    noise = np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(b"\xff\xd8\xff\xe0" + noise.replace(b"\xff", b"\x00") + b"\xff\xd9")


def cut_and_end(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3] + b"\xff\xd9")


def set_cells(csv: str, row: int, **values) -> Callable[[Path], None]:
    def edit(data_dir: Path) -> None:
        frame = pd.read_csv(data_dir / csv, dtype=str)
        for column, value in values.items():
            frame.loc[row, column] = value
        frame.to_csv(data_dir / csv, index=False)

    return edit


def on_image(name: str, change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Apply `change` to one file of a Plant Pathology 2020 layout's images/ folder."""
    return lambda data_dir: change(data_dir / "images" / name)


# kind: (format, breakage, error or None, warning or None); the texts are regexes.
CASES = {
    "truncated jpeg": (
        "pp2020",
        on_image("Train_0.jpg", truncate),
        r"images/Train_0\.jpg: truncated JPEG file, cannot decode it \(",
        None,
    ),
    "zero bytes": (
        "pp2020",
        on_image("Train_1.jpg", lambda p: p.write_bytes(b"")),
        r"images/Train_1\.jpg: empty file \(0 bytes\)",
        None,
    ),
    "missing file": (
        "pp2020",
        on_image("Train_2.jpg", Path.unlink),
        r"images/Train_2\.jpg: missing image file",
        None,
    ),
    "missing test file": (
        "pp2020",
        on_image("Test_0.jpg", Path.unlink),
        r"images/Test_0\.jpg: missing image file",
        None,
    ),
    "duplicate id": (
        "pp2020",
        set_cells("train.csv", 4, image_id="Train_3"),
        r"train\.csv row 6: duplicate id Train_3 \(also row 5\)",
        None,
    ),
    "two labels": (
        "pp2020",
        set_cells("train.csv", 5, healthy="1", rust="1", scab="0", multiple_diseases="0"),
        r"train\.csv row 7 \(Train_5\): 2 positive classes \(healthy, rust\), expected exactly 1",
        None,
    ),
    "bad integer label": (
        "cassava",
        set_cells("train.csv", 2, label="7"),
        r"train\.csv row 4 \(\S+\.jpg\): label '7' is not one of 0\.\.4",
        None,
    ),
    "empty multilabel": (
        "pp2021",
        set_cells("train.csv", 3, labels=""),
        r"train\.csv row 5 \(\S+\.jpg\): empty labels",
        None,
    ),
    "png named jpg": (
        "pp2020",
        on_image("Train_6.jpg", lambda p: save_as(p, "RGB", "PNG")),
        None,
        r"images/Train_6\.jpg: PNG named \.jpg \(decoded anyway",
    ),
}
# Found only by decoding every image: `check` without --no-decode.
DECODE_CASES = {
    "cmyk jpeg": (
        on_image("Train_7.jpg", lambda p: save_as(p, "CMYK")),
        None,
        r"images/Train_7\.jpg: CMYK image \(mode CMYK\), converted to RGB",
    ),
    "grayscale jpeg": (
        on_image("Train_8.jpg", lambda p: save_as(p, "L")),
        None,
        r"images/Train_8\.jpg: grayscale image \(mode L\), converted to RGB",
    ),
    "noise between jpeg markers": (
        on_image("Train_9.jpg", corrupt_inside),
        r"images/Train_9\.jpg: cannot decode image \(",
        None,
    ),
    # libjpeg-turbo refuses it; PIL decodes it with the missing rows grey.
    "jpeg cut short with its end marker put back": (
        on_image("Train_10.jpg", cut_and_end),
        None,
        r"images/Train_10\.jpg: corrupt JPEG data \(Corrupt JPEG data: premature end of data "
        r"segment\), decoded with the damaged part filled in",
    ),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    """A tiny clean data set per label format (copy before breaking)."""
    root = tmp_path_factory.mktemp("clean")
    return {
        fmt: synth.write_dataset(root / fmt, 12, 2, seed=5, size=(40, 32), fmt=fmt)
        for fmt in synth.FORMATS
    }


def broken_copy(source: Path, target: Path, *edits: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    for edit in edits:
        edit(target)
    return target


def found(pattern: str, items: list[str]) -> bool:
    return any(re.search(pattern, item) for item in items)


@pytest.mark.parametrize("kind", CASES)
def test_cheap_check_finds(kind, clean, tmp_path):
    fmt, edit, error, warning = CASES[kind]
    data_dir = broken_copy(clean[fmt], tmp_path / "data", edit)
    data, problems = scan(data_dir)
    assert data is not None
    assert problems.errors == ([problems.errors[0]] if error else []), problems.errors
    assert problems.warnings == ([problems.warnings[0]] if warning else []), problems.warnings
    if error:
        assert found(error, problems.errors), problems.errors
        with pytest.raises(UserError, match=error):
            read_dataset(data_dir)
    else:
        assert found(warning, problems.warnings), problems.warnings
        assert read_dataset(data_dir).warnings == problems.warnings
        assert all(decode(p, 16)[0].shape == (16, 16, 3) for p in data.train.paths)


@pytest.mark.parametrize("kind", DECODE_CASES)
def test_decode_check_finds(kind, clean, tmp_path):
    edit, error, warning = DECODE_CASES[kind]
    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", edit)
    data, problems = scan(data_dir)
    assert problems.errors == [] and problems.warnings == []  # the cheap check cannot tell
    verify_images(data.train.paths + data.test.paths, problems, workers=2)
    assert found(error, problems.errors) if error else problems.errors == []
    assert found(warning, problems.warnings) if warning else problems.warnings == []


def test_corrupt_jpeg_data_is_counted_alike_by_check_prepare_and_train(clean, tmp_path):
    damaged = ("Train_3.jpg", "Train_10.jpg")
    data_dir = broken_copy(
        clean["pp2020"],
        tmp_path / "data",
        lambda d: [cut_and_end(d / "images" / name) for name in damaged],
    )
    result = run_cli("leaf_xla", "check", "--data-dir", str(data_dir))
    listed = [line for line in result.stdout.splitlines() if "corrupt JPEG data" in line]
    assert sorted(line.split("/")[-1].split(":")[0] for line in listed) == sorted(damaged)
    prepared = run_cli("leaf_xla", "prepare", "--data-dir", str(data_dir), "--size", "16")
    assert prepared.returncode == 0 and prepared.stderr.count("corrupt JPEG data") == 2
    started = run_cli(
        "leaf_xla",
        "train",
        *TRAIN_ARGS,
        *("--data-dir", str(data_dir), "--out-dir", str(tmp_path / "runs"), "--cache", "build"),
        *("--cache-dir", str(tmp_path / "cache"), "--holdout", "0.4"),
        *("--soft-targets", str(tmp_path / "absent.csv")),  # stops it after its report
    )
    assert started.stderr.count("corrupt JPEG data") == 2, started.stderr
    assert "absent.csv" in started.stderr


def test_decode_check_skips_files_already_reported(tmp_path):
    path = tmp_path / "gone.jpg"
    problems = Problems(errors=[f"{path}: missing image file"], bad_files={path})
    verify_images([path], problems)
    assert problems.errors == [f"{path}: missing image file"]


# --- the command lines: every offender at once --------------------------------------------

TRAIN_ARGS = ("--model", "test_resnet", "--config", "demo", "--epochs", "1", "--device", "cpu")
PP2020_ERRORS = ["truncated jpeg", "zero bytes", "missing file", "duplicate id", "two labels"]
PP2020_WARNINGS = ["png named jpg"]


@pytest.fixture(scope="module")
def broken_pp2020(clean, tmp_path_factory) -> Path:
    edits = [CASES[k][1] for k in PP2020_ERRORS + PP2020_WARNINGS]
    edits += [case[0] for case in DECODE_CASES.values()]
    return broken_copy(clean["pp2020"], tmp_path_factory.mktemp("broken") / "pp2020", *edits)


@pytest.fixture(scope="module")
def check_report(broken_pp2020):
    return run_cli("leaf_xla", "check", "--data-dir", str(broken_pp2020), "--workers", "2")


@pytest.mark.parametrize("kind", PP2020_ERRORS + PP2020_WARNINGS + list(DECODE_CASES))
def test_check_cli_reports(kind, check_report):
    assert check_report.returncode == 1, check_report.stdout + check_report.stderr
    error, warning = (CASES[kind] if kind in CASES else (None, None, *DECODE_CASES[kind]))[-2:]
    lines = check_report.stdout.splitlines()
    errors = [line.strip() for line in lines if line.strip().startswith("error: ")]
    warnings = [line.strip() for line in lines if line.strip().startswith("warning: ")]
    assert found(error, errors) if error else found(warning, warnings), check_report.stdout


def test_check_cli_summary(check_report):
    out = check_report.stdout
    assert "label format: onehot" in out
    assert "train: train.csv (id column image_id), images in images/" in out
    assert "test images: 2" in out and "train images: 12" in out
    assert "NOT usable for training: 6 error(s), 4 warning(s)" in out, out


def test_no_decode_skips_the_decode_check(broken_pp2020):
    result = run_cli("leaf_xla", "check", "--data-dir", str(broken_pp2020), "--no-decode")
    assert result.returncode == 1
    assert "decode check: skipped" in result.stdout
    assert "5 error(s), 1 warning(s)" in result.stdout, result.stdout


def test_check_cli_clean_data_passes_with_warnings(clean, tmp_path):
    def gray(data_dir: Path) -> None:
        save_as(sorted((data_dir / "train_images").iterdir())[0], "L")

    data_dir = broken_copy(clean["cassava"], tmp_path / "data", gray)
    result = run_cli("leaf_xla", "check", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "label format: integer" in result.stdout
    assert "Cassava Mosaic Disease (CMD)" in result.stdout
    assert "OK: 0 error(s), 1 warning(s)" in result.stdout


def test_check_cli_missing_data_dir_is_a_user_error(tmp_path):
    result = run_cli("leaf_xla", "check", "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert_user_error(result, "nowhere", "not found")


def test_train_stops_naming_every_offender(broken_pp2020, tmp_path):
    out = tmp_path / "runs"
    result = run_cli(
        "leaf_xla", "train", *TRAIN_ARGS, "--data-dir", str(broken_pp2020), "--out-dir", str(out)
    )
    fragments = ["5 problems", "Train_0.jpg: truncated JPEG", "Train_1.jpg: empty file"]
    fragments += ["Train_2.jpg: missing image file", "duplicate id Train_3", "row 7 (Train_5)"]
    assert_user_error(result, *fragments)
    assert not out.exists()  # stopped before folds, run folder or model


@pytest.mark.parametrize("kind", ["bad integer label", "empty multilabel"])
def test_train_stops_on_bad_labels(kind, clean, tmp_path):
    fmt, edit, error, _ = CASES[kind]
    data_dir = broken_copy(clean[fmt], tmp_path / "data", edit)
    out = tmp_path / "runs"
    result = run_cli(
        "leaf_xla", "train", *TRAIN_ARGS, "--data-dir", str(data_dir), "--out-dir", str(out)
    )
    assert_user_error(result, "train.csv row")
    assert found(error, [result.stderr])
    assert not out.exists()


# --- ids as written, and verdicts that match what train and predict do (issue 11) ----------


def rename_id(old: str, new: str) -> Callable[[Path], None]:
    """Give a pp2020 image another id in train.csv and on disk."""

    def edit(data_dir: Path) -> None:
        frame = pd.read_csv(data_dir / "train.csv", dtype=str)
        frame.loc[frame.image_id == old, "image_id"] = new
        frame.to_csv(data_dir / "train.csv", index=False)
        (data_dir / "images" / f"{old}.jpg").rename(data_dir / "images" / f"{new}.jpg")

    return edit


@pytest.mark.parametrize("image_id", ["NA", "null", "nan"])
def test_ids_that_pandas_calls_missing_are_ids(image_id, clean, tmp_path):
    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", rename_id("Train_0", image_id))
    data, problems = scan(data_dir)
    assert problems.errors == [], problems.errors
    assert image_id in data.train.ids
    assert data.train.paths[data.train.ids.index(image_id)].name == f"{image_id}.jpg"


def test_sample_submission_ids_are_stripped_like_test_ids(clean, tmp_path):
    def pad(data_dir: Path) -> None:
        sample = pd.read_csv(data_dir / "sample_submission.csv", dtype=str)
        sample["image_id"] = " " + sample["image_id"] + " "
        sample.to_csv(data_dir / "sample_submission.csv", index=False)

    data = read_dataset(broken_copy(clean["pp2020"], tmp_path / "data", pad))
    assert data.sample_submission["image_id"].tolist() == data.test.ids


@pytest.mark.parametrize("image_id", ["../outside", "/etc/passwd", "sub/../../x.jpg"])
def test_ids_outside_the_image_folder_are_errors(image_id, clean, tmp_path):
    data_dir = broken_copy(
        clean["pp2020"], tmp_path / "data", set_cells("train.csv", 3, image_id=image_id)
    )
    _, problems = scan(data_dir)
    assert problems.errors == [
        f"train.csv row 5: image id {image_id!r} points outside images/; ids name files inside "
        "the image folder"
    ]


@pytest.mark.parametrize("image_id", ["Train_3\x00.jpg", "Train\x1b[31m_3", "Train\t3"])
def test_ids_with_control_characters_are_errors_naming_the_row(image_id, clean, tmp_path):
    data_dir = broken_copy(
        clean["pp2020"], tmp_path / "data", set_cells("train.csv", 3, image_id=image_id)
    )
    _, problems = scan(data_dir)
    assert problems.errors == [
        f"train.csv row 5: image id {image_id!r} holds a control character; ids are file names"
    ]
    code, errors, _, _ = check_cli(data_dir)
    assert code != 0 and len(errors) == 1 and "train.csv row 5" in errors[0]


def test_train_rejects_an_id_outside_the_image_folder(clean, tmp_path):
    edit = set_cells("train.csv", 3, image_id="../../secret")
    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", edit)
    result = run_cli(
        "leaf_xla",
        "train",
        *TRAIN_ARGS,
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(tmp_path / "r"),
    )
    assert_user_error(result, "train.csv row 5", "'../../secret'", "points outside images/")


def check_cli(data_dir: Path) -> tuple[int, list[str], list[str], str]:
    result = run_cli("leaf_xla", "check", "--data-dir", str(data_dir), "--no-decode")
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    warnings = [line for line in lines if line.startswith("warning: ")]
    return result.returncode, errors, warnings, lines[-1]


def test_check_fails_without_train_csv_as_train_does(clean, tmp_path):
    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", lambda d: (d / "train.csv").unlink())
    code, errors, _, verdict = check_cli(data_dir)
    assert code == 1 and verdict.startswith("NOT usable for training: 1 error(s)")
    assert errors == [f"error: {data_dir}: no train.csv, so train cannot run on it (predict can)"]


def test_header_only_train_csv_is_one_error_in_check_and_train(clean, tmp_path):
    def header_only(data_dir: Path) -> None:
        path = data_dir / "train.csv"
        path.write_text(path.read_text().splitlines()[0] + "\n")

    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", header_only)
    code, errors, _, _ = check_cli(data_dir)
    assert code == 1
    assert errors == [
        f"error: {data_dir / 'train.csv'}: no rows under the header, so nothing to train on"
    ]
    result = run_cli(
        "leaf_xla",
        "train",
        *TRAIN_ARGS,
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(tmp_path / "r"),
    )
    assert_user_error(result, "train.csv: no rows under the header")


def test_no_test_ids_is_a_warning_for_training_and_an_error_for_predict(clean, tmp_path):
    def no_test(data_dir: Path) -> None:
        (data_dir / "test.csv").unlink()
        (data_dir / "sample_submission.csv").unlink()

    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", no_test)
    code, errors, warnings, verdict = check_cli(data_dir)
    assert code == 0 and errors == [], errors
    assert verdict == "OK: 0 error(s), 1 warning(s)"
    assert (
        "neither test.csv nor sample_submission.csv, so predict has no test images" in warnings[0]
    )
    assert read_dataset(data_dir).test.ids == []  # train reads it
    with pytest.raises(UserError, match="neither test.csv nor sample_submission.csv found"):
        read_dataset(data_dir, need_train=False, need_test=True)  # predict's and the recipe's


def test_a_text_column_in_onehot_train_csv_is_ignored_with_a_warning(clean, tmp_path):
    def add_source(data_dir: Path) -> None:
        frame = pd.read_csv(data_dir / "train.csv")
        frame["source"] = ["kaggle", "field trip"] * (len(frame) // 2)
        frame.to_csv(data_dir / "train.csv", index=False)

    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", add_source)
    code, errors, warnings, _ = check_cli(data_dir)
    assert code == 0 and errors == []
    assert warnings == [
        "warning: train.csv: column 'source' holds text, not 0/1 labels: ignored (name the class "
        "columns with --classes to choose them)"
    ]
    assert read_dataset(data_dir).classes == list(synth.PP2020_CLASSES)


def test_a_numeric_non_label_column_is_one_error_naming_it(clean, tmp_path):
    def add_width(data_dir: Path) -> None:
        frame = pd.read_csv(data_dir / "train.csv")
        frame["width"] = 512
        frame.to_csv(data_dir / "train.csv", index=False)

    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", add_width)
    _, problems = scan(data_dir)
    assert len(problems.errors) == 1
    assert "column 'width' is not a 0/1 class column" in problems.errors[0]
    assert "--classes" in problems.errors[0]
    data = read_dataset(data_dir, classes=list(synth.PP2020_CLASSES))  # the advice works
    assert data.classes == list(synth.PP2020_CLASSES)


def _errors(result) -> list[str]:
    return [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("error")]


def test_single_names_in_a_labels_column_give_a_submission_of_names(clean, tmp_path):
    """Issue 22.1: `image_id,labels` with one class name per row is single-label; check shows
    the submission's exact shape, and ensemble writes names where the sample has names."""

    def plural_header(data_dir: Path) -> None:
        train = pd.read_csv(data_dir / "train.csv", dtype=str)
        train.rename(columns={"label": "labels"}).to_csv(data_dir / "train.csv", index=False)

    data_dir = broken_copy(clean["generic"], tmp_path / "data", plural_header)
    result = run_cli("leaf_xla", "check", "--data-dir", str(data_dir), "--no-decode")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "label format: generic" in out and "single-label" in out, out
    assert "submission (the shape of sample_submission.csv): the top class's name" in out, out
    assert "\n  image_id,label\n  query_0000,healthy\n" in out, out

    ids = pd.read_csv(data_dir / "sample_submission.csv", dtype=str)["image_id"]
    probs = np.random.default_rng(0).dirichlet(np.ones(4), len(ids))
    predictions = pd.DataFrame(probs, columns=list(synth.GENERIC_CLASSES))
    predictions.insert(0, "image_id", ids)
    predictions.to_csv(tmp_path / "pred.csv", index=False)
    submission = tmp_path / "submission.csv"
    result = run_cli(
        "leaf_xla", "ensemble", str(tmp_path / "pred.csv"), "--data-dir", str(data_dir),
        "--out", str(submission),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(submission, dtype=str)
    assert written["label"].tolist() == [synth.GENERIC_CLASSES[k] for k in probs.argmax(1)]

    # A sample of numbers for data of names: check fails, naming the file, as ensemble would.
    set_cells("sample_submission.csv", slice(None), label="3")(data_dir)
    result = run_cli("leaf_xla", "check", "--data-dir", str(data_dir), "--no-decode")
    assert result.returncode == 1
    assert _errors(result) == [
        f"error: {data_dir / 'sample_submission.csv'}: column 'label' holds numbers (e.g. '3') "
        "but train.csv's generic labels give class names: write train.csv's labels as the "
        "submission wants them (or Cassava's label_num_to_disease_map.json for numbers)"
    ], result.stdout
    result = run_cli(
        "leaf_xla", "ensemble", str(tmp_path / "pred.csv"), "--data-dir", str(data_dir),
        "--out", str(tmp_path / "numbers.csv"),
    )  # fmt: skip
    assert_user_error(result, "sample_submission.csv", "holds numbers")


@pytest.mark.parametrize(
    ("fmt", "what", "first"),
    [
        ("pp2020", "one probability column per class", None),
        ("pp2021", "the class names above the threshold, at least the top one", "complex"),
        ("cassava", "the top class's number", "0"),
    ],
)
def test_check_prints_each_layouts_submission(fmt, what, first, clean):
    result = run_cli("leaf_xla", "check", "--data-dir", str(clean[fmt]), "--no-decode")
    assert result.returncode == 0, result.stdout
    sample = (clean[fmt] / "sample_submission.csv").read_text().splitlines()
    lines = result.stdout.splitlines()
    at = lines.index(f"submission (the shape of sample_submission.csv): {what}")
    header, row = (line.strip() for line in lines[at + 1 : at + 3])
    assert header == sample[0] and row.split(",")[0] == sample[1].split(",")[0]
    assert row.split(",")[1:] == (["0.7", *["0.1"] * 3] if fmt == "pp2020" else [first])


def test_a_miscased_sample_column_stops_check_and_train(clean, tmp_path):
    """Issue 22.3: `Healthy` in sample_submission.csv where train.csv has `healthy`: one error
    line naming the file and the names, from check and from train before it builds a model."""

    def capitalise(data_dir: Path) -> None:
        sample = pd.read_csv(data_dir / "sample_submission.csv", dtype=str)
        sample.rename(columns={"healthy": "Healthy"}).to_csv(
            data_dir / "sample_submission.csv", index=False
        )

    data_dir = broken_copy(clean["pp2020"], tmp_path / "data", capitalise)
    expected = (
        f"{data_dir / 'sample_submission.csv'}: its columns are neither the classes of train.csv "
        "nor one label column (Healthy is not a class; class(es) healthy not a column): spell "
        "the columns as train.csv spells the classes"
    )
    result = run_cli("leaf_xla", "check", "--data-dir", str(data_dir), "--no-decode")
    assert result.returncode == 1
    assert _errors(result) == [f"error: {expected}"], result.stdout
    out = tmp_path / "runs"
    result = run_cli(
        "leaf_xla", "train", *TRAIN_ARGS, "--data-dir", str(data_dir), "--out-dir", str(out)
    )
    assert_user_error(result, expected)
    assert not out.exists()
