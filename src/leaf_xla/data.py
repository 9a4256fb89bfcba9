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

Two levels of checks. `scan` (and `read_dataset`, which raises on what it finds) is cheap enough
for every training run: CSV columns and labels, ids, and each image file's first and last bytes
(missing, empty, cut short, not what its name says). `verify_images` decodes every file: the
check for corruption that only a decoder sees, and for odd colour modes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from leaf_xla.cli import UserError

LABEL_FORMATS = ("auto", "onehot", "multilabel", "integer")
ID_COLUMNS = ("image_id", "image")
# The format each accepted file name promises; an id without one of these gets `.jpg`.
SUFFIX_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
TAIL_BYTES = 1024  # read from each file's end to find the end-of-image marker
VERIFY_SIZE = 64  # the decode check decodes at 1/8 scale: every byte parsed, few pixels made
SHOWN = 5  # offenders listed in an error before "and N more"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
T = TypeVar("T")


@dataclass
class Split:
    """One split: ids as written in the CSV, their image files and (train only) targets."""

    ids: list[str]
    paths: list[Path]
    targets: np.ndarray | None = None  # (N, C) float32: one-hot or multi-hot
    csv: str = ""  # the CSV the ids came from
    image_dir: Path | None = None


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
    bad_files: set[Path] = field(default_factory=set)  # already an error: not decoded again

    def add(self, path: Path, error: str | None, warning: str | None) -> None:
        """Record one file's outcome; a file with an error is not decoded again."""
        if error:
            self.errors.append(error)
            self.bad_files.add(path)
        if warning:
            self.warnings.append(warning)

    def raise_if_any(self, what: str, data_dir: Path | str = "DIR") -> None:
        if len(self.errors) == 1:
            raise UserError(self.errors[0])  # it names its file or row
        if self.errors:
            shown = "; ".join(self.errors[:SHOWN])
            more = f"; and {len(self.errors) - SHOWN} more" if len(self.errors) > SHOWN else ""
            raise UserError(
                f"{what}: {len(self.errors)} problems: {shown}{more} "
                f"(python -m leaf_xla.check --data-dir {data_dir} lists them all)"
            )


class DecodeError(UserError):
    """An image file the decoder rejects (truncated, corrupt, not an image)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot decode image ({reason})")
        self.reason = reason


def read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path} not found: expected the competition's CSV files in that folder")
    try:
        # Ids and labels as written: "007" stays "007", an error quotes the cell's own text.
        frame = pd.read_csv(path, dtype={c: str for c in (*ID_COLUMNS, "label", "labels")})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _id_column(frame: pd.DataFrame, path: Path) -> str:
    for column in ID_COLUMNS:
        if column in frame.columns:
            return column
    raise UserError(f"{path}: no image id column (expected one of {', '.join(ID_COLUMNS)})")


def detect_format(frame: pd.DataFrame) -> str:
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
    name = image_id if image_id.lower().endswith(tuple(SUFFIX_FORMATS)) else f"{image_id}.jpg"
    return image_dir / name


def _row(frame: pd.DataFrame, index: int, id_column: str) -> str:
    # The CSV line number (the header is line 1) and the id: what a user searches for.
    return f"row {index + 2} ({frame[id_column].iloc[index]})"


def _onehot(
    frame: pd.DataFrame, path: Path, id_column: str, classes: list[str], problems: Problems
) -> tuple[np.ndarray, list[str]]:
    class_columns = [c for c in frame.columns if c not in ID_COLUMNS]
    if classes:
        missing = [c for c in classes if c not in frame.columns]
        if missing:
            raise UserError(f"{path}: class column(s) {', '.join(missing)} not found")
        class_columns = list(classes)
    if len(class_columns) < 2:
        raise UserError(f"{path}: expected at least two class columns after the id column")
    values = frame[class_columns].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    binary = np.isin(values, (0, 1)).all(axis=1)
    for i in np.flatnonzero(~binary):
        problems.errors.append(
            f"{path.name} {_row(frame, i, id_column)}: class values must be 0 or 1"
        )
    for i in np.flatnonzero(binary & (values.sum(1) != 1)):
        positive = [c for c, v in zip(class_columns, values[i]) if v == 1]
        problems.errors.append(
            f"{path.name} {_row(frame, i, id_column)}: {len(positive)} positive classes "
            f"({', '.join(positive) or 'none'}), expected exactly 1"
        )
    return np.nan_to_num(values).astype(np.float32), class_columns


def _multilabel(
    frame: pd.DataFrame, path: Path, id_column: str, classes: list[str], problems: Problems
) -> tuple[np.ndarray, list[str]]:
    if "labels" not in frame.columns:
        raise UserError(f"{path}: label format multilabel needs a 'labels' column")
    tokens = [str(v).split() if isinstance(v, str) else [] for v in frame["labels"]]
    for i in (i for i, t in enumerate(tokens) if not t):
        problems.errors.append(
            f"{path.name} {_row(frame, i, id_column)}: empty labels (write 'healthy' or the "
            "disease names)"
        )
    found = sorted({t for row in tokens for t in row})
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{path}: labels {', '.join(unknown)} are not in the classes option")
    index = {c: k for k, c in enumerate(classes)}
    values = np.zeros((len(frame), len(classes)), np.float32)
    for i, row in enumerate(tokens):
        values[i, [index[t] for t in row]] = 1
    return values, classes


def _integer(
    frame: pd.DataFrame,
    path: Path,
    id_column: str,
    classes: list[str],
    data_dir: Path,
    problems: Problems,
) -> tuple[np.ndarray, list[str]]:
    if "label" not in frame.columns:
        raise UserError(f"{path}: label format integer needs a 'label' column")
    labels = pd.to_numeric(frame["label"], errors="coerce").to_numpy(float)
    whole = np.isfinite(labels) & (labels == np.round(labels)) & (labels >= 0)
    mapping = data_dir / "label_num_to_disease_map.json"
    if not classes and mapping.is_file():
        try:
            names = json.loads(mapping.read_text())
            classes = [str(names[str(k)]) for k in range(len(names))]
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f'{mapping}: expected {{"0": "name", "1": ...}} numbered from 0'
            ) from None
    elif not classes:
        # Names are the numbers found; a gap means a typo (a 40 among 0..4 would make 41 classes).
        top = int(labels[whole].max()) if whole.any() else -1
        counts = np.bincount(labels[whole].astype(int), minlength=top + 1)
        unused = np.flatnonzero(counts == 0)
        if unused.size:
            raise UserError(
                f"{path}: no row has label {', '.join(map(str, unused[:SHOWN]))} but one has "
                f"{top} ({_row(frame, int(np.flatnonzero(labels == top)[0]), id_column)}): "
                "fix the label, or name the classes in label_num_to_disease_map.json or --classes"
            )
        classes = [str(k) for k in range(top + 1)]
    bad = ~(whole & (labels < len(classes)))
    text = frame["label"].fillna("").tolist()
    for i in np.flatnonzero(bad):
        problems.errors.append(
            f"{path.name} {_row(frame, i, id_column)}: label {text[i]!r} is not "
            f"one of 0..{len(classes) - 1}"
        )
    values = np.zeros((len(frame), len(classes)), np.float32)
    rows = np.flatnonzero(~bad)
    values[rows, labels[rows].astype(int)] = 1
    return values, classes


def _targets(
    frame: pd.DataFrame,
    path: Path,
    label_format: str,
    id_column: str,
    classes: list[str],
    data_dir: Path,
    problems: Problems,
) -> tuple[np.ndarray, list[str]]:
    if label_format == "onehot":
        return _onehot(frame, path, id_column, classes, problems)
    if label_format == "multilabel":
        return _multilabel(frame, path, id_column, classes, problems)
    if label_format == "integer":
        return _integer(frame, path, id_column, classes, data_dir, problems)
    raise UserError(f"label_format must be one of {', '.join(LABEL_FORMATS)}, got {label_format!r}")


def _format_of(head: bytes) -> str | None:
    """The image format a file's first bytes announce."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


def inspect_file(path: Path) -> tuple[str | None, str | None]:
    """The cheap check of one image file: (error, warning), each None when fine.

    Reads the first and last bytes: missing, empty, content not what the name says, or cut short
    (a JPEG without its end-of-image marker, a PNG without IEND). Only a file that looks wrong is
    decoded, to tell one that still decodes (a warning) from one that does not (an error).
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
            tail = handle.read()
    except FileNotFoundError:
        return f"{path}: missing image file", None
    except OSError as err:
        return f"{path}: cannot read ({err.strerror})", None
    if not head:
        return f"{path}: empty file (0 bytes)", None
    kind = _format_of(head)
    named = SUFFIX_FORMATS.get(path.suffix.lower())
    # Cameras may pad a JPEG with zeros after its end marker.
    cut = (kind == "JPEG" and not tail.rstrip(b"\0").endswith(b"\xff\xd9")) or (
        kind == "PNG" and b"IEND" not in tail
    )
    if kind == named and not cut:
        return None, None
    try:
        decode(path, VERIFY_SIZE)
    except DecodeError as err:
        what = f"truncated {kind} file" if cut else f"not a {named} file (starts {head[:4].hex()})"
        return f"{path}: {what}, cannot decode it ({err.reason})", None
    if kind == named:
        return None, None
    shown = kind or f"an unrecognised format (starts {head[:4].hex()})"
    slower = ", without the fast JPEG path" if named == "JPEG" else ""
    return None, f"{path}: {shown} named {path.suffix} (decoded anyway{slower})"


def _files(
    ids: Sequence[str], image_dir: Path, csv_name: str, problems: Problems, workers: int = 8
) -> list[Path]:
    """Paths for ids; missing, empty, broken and duplicate entries become problems."""
    paths = [image_path(image_dir, i) for i in ids]
    seen: dict[str, int] = {}
    for k, image_id in enumerate(ids):
        if not image_id:
            problems.errors.append(f"{csv_name} row {k + 2}: empty image id")
        elif image_id in seen:
            first = seen[image_id] + 2
            problems.errors.append(
                f"{csv_name} row {k + 2}: duplicate id {image_id} (also row {first})"
            )
        seen.setdefault(image_id, k)
    # Threads: on a network disk (a bucket mount) each open waits on a round trip.
    with ThreadPoolExecutor(workers) as pool:
        for path, (error, warning) in zip(paths, pool.map(inspect_file, paths)):
            problems.add(path, error, warning)
    return paths


def _read_train(
    data_dir: Path, label_format: str, classes: list[str], problems: Problems
) -> tuple[Split, str, list[str], str]:
    """train.csv and its images: (split, label format, classes, id column)."""
    path = data_dir / "train.csv"
    frame = read_csv(path)
    id_column = _id_column(frame, path)
    frame[id_column] = frame[id_column].fillna("").str.strip()
    fmt = detect_format(frame) if label_format == "auto" else label_format
    targets, classes = _targets(frame, path, fmt, id_column, classes, data_dir, problems)
    for name in np.asarray(classes)[targets.sum(0) == 0]:
        problems.warnings.append(f"{path.name}: no image of class {name}")
    ids = frame[id_column].tolist()
    image_dir = _image_dir(data_dir, "train")
    paths = _files(ids, image_dir, path.name, problems)
    return Split(ids, paths, targets, path.name, image_dir), fmt, classes, id_column


def _read_test(data_dir: Path, sample: pd.DataFrame | None, problems: Problems) -> Split | None:
    path = data_dir / "test.csv"
    if path.is_file():
        frame = read_csv(path)
    elif sample is not None:
        frame, path = sample, data_dir / "sample_submission.csv"
    elif (data_dir / "sample_submission.csv").is_file():
        return None  # unreadable: reported already
    else:
        raise UserError(f"{data_dir}: neither test.csv nor sample_submission.csv found")
    ids = frame[_id_column(frame, path)].fillna("").str.strip().tolist()
    image_dir = _image_dir(data_dir, "test")
    return Split(ids, _files(ids, image_dir, path.name, problems), None, path.name, image_dir)


def _collect(problems: Problems, read: Callable[..., T], *args: object) -> T | None:
    """`read(*args)`, or None with its error recorded: one broken part must not hide the rest."""
    try:
        return read(*args)
    except UserError as err:
        problems.errors.append(str(err))
        return None


def scan(
    data_dir: Path | str,
    label_format: str = "auto",
    classes: Sequence[str] | None = None,
    need_train: bool = True,
) -> tuple[DataSet | None, Problems]:
    """Read the CSVs and run the cheap checks, collecting every problem rather than stopping.

    The DataSet is None when a split cannot be read at all (a CSV, a column or the image folder
    missing): the problems say why.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} not found (--data-dir)")
    problems = Problems()
    sample_path = data_dir / "sample_submission.csv"
    sample = _collect(problems, read_csv, sample_path) if sample_path.is_file() else None

    classes = list(classes or [])
    if need_train or (data_dir / "train.csv").is_file():
        read = _collect(problems, _read_train, data_dir, label_format, classes, problems)
        train, fmt, classes, id_column = read or (None, label_format, classes, "image_id")
    else:
        fmt, id_column = label_format, "image_id"
        train = Split([], [], np.zeros((0, len(classes)), np.float32))
    test = _collect(problems, _read_test, data_dir, sample, problems)
    if train is None or test is None:
        return None, problems
    if not classes and sample is not None:
        classes = [c for c in sample.columns if c not in ID_COLUMNS]
    data = DataSet(data_dir, fmt, classes, id_column, train, test, sample, problems.warnings)
    return data, problems


def read_dataset(
    data_dir: Path | str,
    label_format: str = "auto",
    classes: Sequence[str] | None = None,
    need_train: bool = True,
) -> DataSet:
    """`scan`, raising a UserError that names the first offenders when it found any error."""
    data, problems = scan(data_dir, label_format, classes, need_train)
    problems.raise_if_any(str(data_dir), data_dir)
    assert data is not None  # only None with errors, raised above
    return data


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
            # exif_transpose copies even when there is nothing to turn: ask first.
            if image.getexif().get(0x0112, 1) != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode != "RGB":
                image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image), mode
    except DECODE_ERRORS as err:
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise DecodeError(path, reason) from None


def verify_images(
    paths: Iterable[Path],
    problems: Problems,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decode every file once (the expensive check): corrupt or not an image, odd colour modes.

    Files already in `problems.bad_files` are skipped: they have their error.
    """
    todo = [p for p in paths if p not in problems.bad_files]

    def one(path: Path) -> tuple[str | None, str | None]:
        try:
            _, mode = decode(path, VERIFY_SIZE)
        except DecodeError as err:
            return str(err), None
        return None, mode_warning(path, mode)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for path, (error, warning) in zip(todo, pool.map(one, todo)):
            problems.add(path, error, warning)
            if progress:
                progress(1)


def mode_warning(path: Path, mode: str) -> str | None:
    """A warning for an image stored in another colour mode than RGB (it is converted)."""
    if mode == "RGB":
        return None
    named = {"L": "grayscale", "P": "palette"}.get(mode, mode)
    shift = " (colours may shift)" if mode == "CMYK" else ""
    return f"{path}: {named} image (mode {mode}), converted to RGB{shift}"
