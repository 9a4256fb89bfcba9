"""Reading and validating a Kaggle leaf-competition data directory.

Three label formats, detected from train.csv's columns or set with `label_format`:
- onehot: one column per class, exactly one 1 per row (Plant Pathology 2020:
  `image_id,healthy,multiple_diseases,rust,scab`);
- multilabel: a `labels` column of space-separated class names (Plant Pathology 2021:
  `image,labels`), trained with sigmoid + BCE;
- integer: a `label` column of class numbers (Cassava 2020: `image_id,label`), names from
  `label_num_to_disease_map.json` or the `classes` option.
Test ids come from test.csv, else sample_submission.csv. Images live in `images/` or
`train_images/` / `test_images/`, named by the id (+ `.jpg` when the id has no extension).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from leaf_xla.cli import UserError

LABEL_FORMATS = ("auto", "onehot", "multilabel", "integer")
ID_COLUMNS = ("image_id", "image")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG"
SHOWN = 5  # offenders listed in an error before "and N more"


@dataclass
class Split:
    """One split: ids as written in the CSV, their image files and (train only) targets."""

    ids: list[str]
    paths: list[Path]
    targets: np.ndarray | None = None  # (N, C) float32: one-hot or multi-hot


@dataclass
class DataSet:
    data_dir: Path
    label_format: str
    classes: list[str]
    id_column: str
    train: Split
    test: Split
    sample_submission: pd.DataFrame | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.label_format == "multilabel"


@dataclass
class Problems:
    """Offenders collected during a check, reported together rather than one at a time."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_if_any(self, what: str) -> None:
        if self.errors:
            shown = "; ".join(self.errors[:SHOWN])
            more = f"; and {len(self.errors) - SHOWN} more" if len(self.errors) > SHOWN else ""
            raise UserError(
                f"{what}: {len(self.errors)} problem(s): {shown}{more} "
                "(python -m leaf_xla.check --data-dir DIR lists them all)"
            )


def read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path} not found: expected the competition's CSV files in that folder")
    try:
        frame = pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _id_column(frame: pd.DataFrame, path: Path) -> str:
    for column in ID_COLUMNS:
        if column in frame.columns:
            return column
    raise UserError(f"{path}: no image id column (expected one of {', '.join(ID_COLUMNS)})")


def detect_format(frame: pd.DataFrame, id_column: str) -> str:
    if "labels" in frame.columns:
        return "multilabel"
    if "label" in frame.columns:
        return "integer"
    return "onehot"


def _image_dir(data_dir: Path, split: str) -> Path:
    for name in (f"{split}_images", "images"):
        if (data_dir / name).is_dir():
            return data_dir / name
    raise UserError(f"{data_dir}: no image folder (expected {split}_images/ or images/)")


def image_path(image_dir: Path, image_id: str) -> Path:
    name = image_id if image_id.lower().endswith(IMAGE_SUFFIXES) else f"{image_id}.jpg"
    return image_dir / name


def _row(index: int) -> str:
    return f"row {index + 2}"  # the CSV line number: header is line 1


def _targets(
    frame: pd.DataFrame,
    path: Path,
    label_format: str,
    classes: list[str] | None,
    data_dir: Path,
    problems: Problems,
) -> tuple[np.ndarray, list[str]]:
    if label_format == "onehot":
        class_columns = [c for c in frame.columns if c not in ID_COLUMNS]
        if classes:
            missing = [c for c in classes if c not in frame.columns]
            if missing:
                raise UserError(f"{path}: class column(s) {', '.join(missing)} not found")
            class_columns = list(classes)
        if len(class_columns) < 2:
            raise UserError(f"{path}: expected at least two class columns after the id column")
        values = frame[class_columns].apply(pd.to_numeric, errors="coerce").to_numpy(float)
        for i in np.flatnonzero(~np.isin(values, (0, 1)).all(axis=1)):
            problems.errors.append(f"{path.name} {_row(i)}: class values must be 0 or 1")
        for i in np.flatnonzero(np.isin(values, (0, 1)).all(axis=1) & (values.sum(1) != 1)):
            got = int(values[i].sum())
            problems.errors.append(f"{path.name} {_row(i)}: {got} positive classes, expected 1")
        return np.nan_to_num(values).astype(np.float32), class_columns
    if label_format == "multilabel":
        if "labels" not in frame.columns:
            raise UserError(f"{path}: label format multilabel needs a 'labels' column")
        tokens = [str(v).split() if isinstance(v, str) else [] for v in frame["labels"]]
        for i in (i for i, t in enumerate(tokens) if not t):
            problems.errors.append(f"{path.name} {_row(i)}: empty labels")
        found = sorted({t for row in tokens for t in row})
        classes = list(classes) if classes else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{path}: labels {', '.join(unknown)} are not in the classes option")
        index = {c: k for k, c in enumerate(classes)}
        values = np.zeros((len(frame), len(classes)), np.float32)
        for i, row in enumerate(tokens):
            values[i, [index[t] for t in row]] = 1
        return values, classes
    if label_format == "integer":
        if "label" not in frame.columns:
            raise UserError(f"{path}: label format integer needs a 'label' column")
        labels = pd.to_numeric(frame["label"], errors="coerce").to_numpy(float)
        if not classes:
            mapping = data_dir / "label_num_to_disease_map.json"
            if mapping.is_file():
                names = json.loads(mapping.read_text())
                classes = [names[str(k)] for k in range(len(names))]
            else:
                classes = [str(k) for k in range(int(np.nanmax(labels)) + 1)]
        bad = ~np.isin(labels, np.arange(len(classes)))
        for i in np.flatnonzero(bad):
            problems.errors.append(
                f"{path.name} {_row(i)}: label {frame['label'].iloc[i]!r} is not in "
                f"0..{len(classes) - 1}"
            )
        values = np.zeros((len(frame), len(classes)), np.float32)
        rows = np.flatnonzero(~bad)
        values[rows, labels[rows].astype(int)] = 1
        return values, classes
    raise UserError(f"label_format must be one of {', '.join(LABEL_FORMATS)}, got {label_format!r}")


def _files(ids: Sequence[str], image_dir: Path, csv_name: str, problems: Problems) -> list[Path]:
    """Paths for ids; missing, empty and duplicate entries become errors."""
    paths = [image_path(image_dir, i) for i in ids]
    seen: dict[str, int] = {}
    for k, (image_id, path) in enumerate(zip(ids, paths)):
        if image_id in seen:
            problems.errors.append(
                f"{csv_name} {_row(k)}: duplicate id {image_id} (first at {_row(seen[image_id])})"
            )
        seen.setdefault(image_id, k)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.errors.append(f"{path}: missing image file")
            continue
        if size == 0:
            problems.errors.append(f"{path}: empty file (0 bytes)")
    return paths


def read_dataset(
    data_dir: Path | str,
    label_format: str = "auto",
    classes: Sequence[str] | None = None,
    need_train: bool = True,
) -> DataSet:
    """Read the CSVs and run the cheap checks (columns, labels, ids, files present)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} not found (--data-dir)")
    problems = Problems()
    sample_path = data_dir / "sample_submission.csv"
    sample = read_csv(sample_path) if sample_path.is_file() else None

    train_path = data_dir / "train.csv"
    if need_train or train_path.is_file():
        train_frame = read_csv(train_path)
        id_column = _id_column(train_frame, train_path)
        train_ids = train_frame[id_column].astype(str).tolist()
        fmt = detect_format(train_frame, id_column) if label_format == "auto" else label_format
        targets, class_list = _targets(
            train_frame, train_path, fmt, list(classes or []), data_dir, problems
        )
        train_paths = _files(train_ids, _image_dir(data_dir, "train"), "train.csv", problems)
    else:
        fmt, class_list, id_column = label_format, list(classes or []), "image_id"
        train_ids, train_paths, targets = [], [], np.zeros((0, len(class_list)), np.float32)

    test_path = data_dir / "test.csv"
    if test_path.is_file():
        test_frame = read_csv(test_path)
    elif sample is not None:
        test_frame, test_path = sample, sample_path
    else:
        raise UserError(f"{data_dir}: neither test.csv nor sample_submission.csv found")
    test_ids = test_frame[_id_column(test_frame, test_path)].astype(str).tolist()
    test_paths = _files(test_ids, _image_dir(data_dir, "test"), test_path.name, problems)
    if not class_list and sample is not None:
        class_list = [c for c in sample.columns if c not in ID_COLUMNS]
    problems.raise_if_any(str(data_dir))
    return DataSet(
        data_dir=data_dir,
        label_format=fmt,
        classes=class_list,
        id_column=id_column,
        train=Split(train_ids, train_paths, targets),
        test=Split(test_ids, test_paths),
        sample_submission=sample,
        warnings=problems.warnings,
    )


def sniff(path: Path) -> str | None:
    """A warning for a file that is not what its name says (checked from its first bytes)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    is_jpeg_name = path.suffix.lower() in (".jpg", ".jpeg")
    if is_jpeg_name and head.startswith(PNG_MAGIC):
        return f"{path}: a PNG named .jpg (decoded anyway, without the fast JPEG path)"
    if is_jpeg_name and not head.startswith(JPEG_MAGIC):
        return f"{path}: not a JPEG (first bytes {head[:4].hex()})"
    return None


def decode(path: Path, size: int | None = None) -> tuple[np.ndarray, str]:
    """Decode to an RGB uint8 array, EXIF orientation applied, resized to size x size.

    JPEGs are decoded with libjpeg's DCT scaling (PIL `draft`) straight to the smallest scale
    that is not below the target, so a 2048x1365 leaf for a 512 px model is decoded at 1024x683
    and never at full size. Returns the array and the file's original mode ("RGB", "CMYK", ...).
    """
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft("RGB", (size, size))
            mode = image.mode
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image), mode
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise UserError(
            f"{path}: cannot decode image ({err}); "
            "replace or remove it (python -m leaf_xla.check lists all)"
        ) from None


def verify_images(paths: Iterable[Path], problems: Problems, workers: int = 4) -> None:
    """Decode every file once (the expensive check): truncated, not an image, odd modes."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: Path) -> tuple[Path, str | None, str | None, str | None]:
        try:
            note = sniff(path)
            _, mode = decode(path)
        except (UserError, OSError) as err:
            return path, str(err), None, None
        converted = None if mode == "RGB" else f"{path}: mode {mode}, converted to RGB"
        return path, None, note, converted

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _path, error, note, converted in pool.map(one, paths):
            if error:
                problems.errors.append(error)
            problems.warnings.extend(w for w in (note, converted) if w)
