"""Reading and validating a Kaggle leaf-competition data directory.

train.csv's label format (one-hot columns, space-separated multi-labels, class numbers, class
names) is detected from its columns or set with `label_format`: see `formats`, where each
format is one entry. Test ids come from test.csv, else sample_submission.csv (ids are read as
written: `NA` is an id, not a missing value). Images live in `images/` or `train_images/` /
`test_images/`, named by the id (+ `.jpg` when the id has no extension); an id that points
outside that folder is an error.

Two levels of checks. `scan` (and `read_dataset`, which raises on what it finds) is cheap enough
for every training run: CSV columns and labels, ids, and each image file's first and last bytes
(missing, empty, cut short, not what its name says). `verify_images` decodes every file: the
check for corruption that only a decoder sees, and for odd colour modes.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pandas as pd
import simplejpeg
import torch
from PIL import Image, ImageOps

from leaf_xla import formats
from leaf_xla.errors import UserError
from leaf_xla.formats import (
    ID_COLUMNS,
    LabelTable,
    id_column,
)
from leaf_xla.settings import ImageShape, check_data_dir, image_shape

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
DCT_SCALES = (8, 4, 2)  # libjpeg's reduced decodes (1/8, 1/4, 1/2), largest reduction first
# The loader runs one decode per thread; OpenCV's own pool inside each call (the rotation of
# a turned photo, the transforms) would only compete with those threads for the same cores.
cv2.setNumThreads(1)
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
        """Several classes per image: sigmoid + BCE (`auto` without train.csv: not known, no)."""
        fmt = formats.FORMATS.get(self.label_format)
        return fmt is not None and fmt.multilabel


@dataclass
class Problems:
    """Offenders collected during a check, reported together rather than one at a time."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bad_files: set[Path] = field(default_factory=set)  # already an error: not decoded again
    file_errors: dict[Path, str] = field(default_factory=dict)  # an image file's own error

    def add(self, path: Path, error: str | None, warning: str | None) -> None:
        """Record one file's outcome; a file with an error is not decoded again."""
        if error:
            self.errors.append(error)
            self.bad_files.add(path)
            self.file_errors[path] = error
        if warning:
            self.warnings.append(warning)

    def take_file_errors(self, paths: Iterable[Path]) -> dict[Path, str]:
        """Remove the errors of these image files (missing, empty, undecodable) and return
        them: the caller decides (`--skip-bad-images` skips training images)."""
        taken = {p: self.file_errors.pop(p) for p in paths if p in self.file_errors}
        dropped = set(taken.values())
        self.errors = [e for e in self.errors if e not in dropped]
        return taken

    def raise_if_any(self, what: str, data_dir: Path | str = "DIR") -> None:
        if len(self.errors) == 1:
            raise UserError(self.errors[0])  # it names its file or row
        if self.errors:
            shown = "; ".join(self.errors[:SHOWN])
            more = f"; and {len(self.errors) - SHOWN} more" if len(self.errors) > SHOWN else ""
            raise UserError(
                f"{what}: {len(self.errors)} problems: {shown}{more} "
                f"(leaf-xla check --data-dir {data_dir} lists them all)"
            )


class DecodeError(UserError):
    """An image file the decoder rejects (truncated, corrupt, not an image)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot decode image ({reason})")
        self.path, self.reason = path, reason


def read_csv(
    path: Path, missing: str = "expected the competition's CSV files in that folder"
) -> pd.DataFrame:
    """A CSV with ids and labels as written: "007" stays "007", `NA` or `null` is an id rather
    than a missing value (only an empty cell is missing), and an error quotes the cell's text.
    A missing or unreadable file is a UserError naming it (`missing` says what was expected)."""
    if not path.is_file():
        raise UserError(f"{path} not found: {missing}")
    try:
        frame = pd.read_csv(
            path,
            dtype={c: str for c in (*ID_COLUMNS, "label", "labels")},
            keep_default_na=False,
            na_values=[""],
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _image_dir(data_dir: Path, split: str) -> Path:
    for name in (f"{split}_images", "images"):
        if (data_dir / name).is_dir():
            return data_dir / name
    raise UserError(f"{data_dir}: no image folder (expected {split}_images/ or images/)")


def image_path(image_dir: Path, image_id: str) -> Path:
    name = image_id if image_id.lower().endswith(tuple(SUFFIX_FORMATS)) else f"{image_id}.jpg"
    return image_dir / name


def _read_ids(frame: pd.DataFrame, path: Path) -> tuple[str, list[str]]:
    """(id column, ids with surrounding spaces stripped), for every CSV that lists images."""
    column = id_column(frame, path)
    frame[column] = frame[column].fillna("").str.strip()
    return column, frame[column].tolist()


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
        elif any(ord(c) < 32 or ord(c) == 127 for c in image_id):  # a NUL fails every open()
            problems.errors.append(
                f"{csv_name} row {k + 2}: image id {image_id!r} holds a control character; "
                "ids are file names"
            )
            problems.bad_files.add(paths[k])
        elif Path(image_id).is_absolute() or ".." in Path(image_id).parts:
            problems.errors.append(
                f"{csv_name} row {k + 2}: image id {image_id!r} points outside "
                f"{image_dir.name}/; ids name files inside the image folder"
            )
            problems.bad_files.add(paths[k])
        elif image_id in seen:
            first = seen[image_id] + 2
            problems.errors.append(
                f"{csv_name} row {k + 2}: duplicate id {image_id} (also row {first})"
            )
        seen.setdefault(image_id, k)
    inside = [p for p in paths if p not in problems.bad_files]
    # Threads: on a network disk (a bucket mount) each open waits on a round trip.
    with ThreadPoolExecutor(workers) as pool:
        for path, (error, warning) in zip(inside, pool.map(inspect_file, inside)):
            problems.add(path, error, warning)
    return paths


def _read_train(
    data_dir: Path, label_format: str, classes: list[str], problems: Problems
) -> tuple[Split, str, list[str], str]:
    """train.csv and its images: (split, label format, classes, id column)."""
    path = data_dir / "train.csv"
    frame = read_csv(path)
    id_column, ids = _read_ids(frame, path)
    if frame.empty:
        raise UserError(f"{path}: no rows under the header, so nothing to train on")
    fmt = formats.detect(frame, data_dir) if label_format == "auto" else formats.get(label_format)
    table = LabelTable(frame, path, id_column, data_dir, problems.errors, problems.warnings)
    targets, classes = fmt.targets(table, classes)
    for name in np.asarray(classes)[targets.sum(0) == 0]:
        problems.warnings.append(f"{path.name}: no image of class {name}")
    image_dir = _image_dir(data_dir, "train")
    paths = _files(ids, image_dir, path.name, problems)
    return Split(ids, paths, targets, path.name, image_dir), fmt.name, classes, id_column


def _read_test(
    data_dir: Path, sample: pd.DataFrame | None, problems: Problems, need_test: bool
) -> Split | None:
    path = data_dir / "test.csv"
    if path.is_file():
        frame = read_csv(path)
    elif sample is not None:
        frame, path = sample, data_dir / "sample_submission.csv"
    elif (data_dir / "sample_submission.csv").is_file():
        return None  # unreadable: reported already
    elif need_test:
        raise UserError(f"{data_dir}: neither test.csv nor sample_submission.csv found")
    else:
        problems.warnings.append(
            f"{data_dir}: neither test.csv nor sample_submission.csv, so predict has no test "
            "images to run on (training can)"
        )
        return Split([], [])
    _, ids = _read_ids(frame, path)
    image_dir = _image_dir(data_dir, "test")
    return Split(ids, _files(ids, image_dir, path.name, problems), None, path.name, image_dir)


def _read_sample(path: Path) -> pd.DataFrame:
    """sample_submission.csv, its ids stripped as test.csv's are (they are matched to them)."""
    frame = read_csv(path)
    _read_ids(frame, path)
    return frame


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
    need_test: bool = False,
) -> tuple[DataSet | None, Problems]:
    """Read the CSVs and run the cheap checks, collecting every problem rather than stopping.

    Without test ids (no test.csv, no sample_submission.csv) the test split is empty, with a
    warning, unless `need_test`. The DataSet is None when a split cannot be read at all (a
    CSV, a column or the image folder missing): the problems say why.
    """
    data_dir = check_data_dir(data_dir)
    problems = Problems()
    sample_path = data_dir / "sample_submission.csv"
    sample = _collect(problems, _read_sample, sample_path) if sample_path.is_file() else None

    classes = list(classes or [])
    if need_train or (data_dir / "train.csv").is_file():
        read = _collect(problems, _read_train, data_dir, label_format, classes, problems)
        train, fmt, classes, id_column = read or (None, label_format, classes, "image_id")
    else:
        fmt, id_column = label_format, "image_id"
        train = Split([], [], np.zeros((0, len(classes)), np.float32))
    test = _collect(problems, _read_test, data_dir, sample, problems, need_test)
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
    need_test: bool = False,
) -> DataSet:
    """`scan`, raising a UserError that names the first offenders when it found any error."""
    data, problems = scan(data_dir, label_format, classes, need_train, need_test)
    problems.raise_if_any(str(data_dir), data_dir)
    assert data is not None  # only None with errors, raised above
    return data


def print_warnings(data: DataSet) -> None:
    """The data set's first warnings on stderr, and how many more `check` would list."""
    for warning in data.warnings[:SHOWN]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(data.warnings) > SHOWN:
        print(
            f"warning: and {len(data.warnings) - SHOWN} more (leaf-xla check "
            f"--data-dir {data.data_dir} lists them)",
            file=sys.stderr,
        )


def _dct_scale(width: int, height: int, shape: ImageShape) -> int:
    """The largest reduction (1, 2, 4, 8) whose DCT-scaled decode is still >= the target."""
    for scale in DCT_SCALES:
        if -(-height // scale) >= shape[0] and -(-width // scale) >= shape[1]:
            return scale
    return 1


def _turns(width: int, height: int, shape: ImageShape) -> bool:
    """A portrait photo for a landscape size (or the other way round) is turned, not squashed."""
    return shape[0] != shape[1] and height != width and (height > width) != (shape[0] > shape[1])


def _as_nchw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)  # channels_last: no copy


def resize_bilinear(rgb: np.ndarray, shape: ImageShape) -> np.ndarray:
    """torch's antialiased bilinear resize of an HWC uint8 image: PIL's BILINEAR filter.

    The out= form of the op behind F.interpolate writes the HWC result straight into its array
    (the same pixels). F.interpolate returns NCHW memory, and turning that back into HWC (what
    the transforms and the cache hold) doubled the cost (bench/decode.py: 5.7 against 2.8 ms
    for a photo at 800 px).
    """
    out = np.empty((*shape, rgb.shape[2]), np.uint8)
    torch.ops.aten._upsample_bilinear2d_aa.out(
        _as_nchw(rgb), list(shape), False, None, None, out=_as_nchw(out)
    )
    return out


def _decode_turbo(data: bytes, width: int, height: int, shape: ImageShape) -> np.ndarray | str:
    """A plain RGB JPEG: libjpeg-turbo's DCT-scaled decode (simplejpeg), then torch's
    antialiased bilinear resize.

    simplejpeg hands the whole image to libjpeg-turbo at once, straight to RGB: the same
    pixels as OpenCV's or PIL's decode at the same scale, in less CPU time (see README,
    "Performance"). The resize is PIL's BILINEAR filter (the same output to about 0.002 of
    255) at a fraction of the time of PIL's or of cv2.INTER_AREA. Both run without the GIL, so
    the loader's threads scale. libjpeg-turbo's complaint where it refuses the file: PIL then
    tries, and reports the error (or fills in what is damaged).
    """
    turn = _turns(width, height, shape)
    stored = shape[::-1] if turn else shape  # the target in the file's own orientation
    scale = _dct_scale(width, height, stored)
    try:
        rgb = simplejpeg.decode_jpeg(
            data, "rgb", min_height=-(-height // scale), min_width=-(-width // scale)
        )
    except ValueError as err:
        return str(err)
    if rgb.shape[:2] != stored:
        rgb = resize_bilinear(rgb, stored)
    if turn:
        rgb = cv2.rotate(rgb, cv2.ROTATE_90_COUNTERCLOCKWISE)  # as PIL's ROTATE_90
    return rgb


def decode(
    path: Path, size: int | str | Sequence[int] | None = None, notes: list[str] | None = None
) -> tuple[np.ndarray, str]:
    """Decode to an RGB uint8 array, EXIF orientation applied, resized to `size`.

    `size`: an --image-size value (512, "480x768" = height x width); None keeps the full size.
    A photo whose orientation (after EXIF) is not the size's, a portrait one for a landscape
    size, is turned 90 degrees counter-clockwise first rather than squashed; square sizes
    squash as before. A plain RGB JPEG (the common case) goes through libjpeg-turbo
    (`_decode_turbo`). Anything else (CMYK, grayscale, palette, an EXIF turn to apply, a file
    cut short, another format under a .jpg name, a full-size decode) goes through PIL: `draft`
    picks libjpeg's DCT scale the same way, then exif_transpose, convert and the same bilinear
    filter. Returns the array and the file's original mode ("RGB", "CMYK", ...).

    `notes`: gets a warning for a JPEG that libjpeg-turbo refuses and PIL decodes (PIL fills
    what is damaged or missing with grey, silently).
    """
    shape = None if size is None else image_shape(size)
    complaint = None
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            # exif_transpose copies even when there is nothing to turn: ask first.
            exif_turned = image.getexif().get(0x0112, 1) != 1
            if (
                shape is not None
                and image.format == "JPEG"
                and mode == "RGB"
                and not exif_turned
                and data.rstrip(b"\0").endswith(b"\xff\xd9")  # else PIL says it is truncated
            ):
                array = _decode_turbo(data, *image.size, shape)
                if not isinstance(array, str):
                    return array, mode
                complaint = array
            if shape is not None:
                # A photo that turns: both sides at least the larger target side.
                turning = exif_turned or _turns(*image.size, shape)
                image.draft("RGB", (max(shape), max(shape)) if turning else shape[::-1])
            if exif_turned:
                image = ImageOps.exif_transpose(image)
            if image.mode != "RGB":
                image = image.convert("RGB")
            if shape is not None:
                if _turns(*image.size, shape):
                    image = image.transpose(Image.Transpose.ROTATE_90)
                if image.size != shape[::-1]:
                    image = image.resize(shape[::-1], Image.Resampling.BILINEAR)
            array = np.asarray(image)
    except DECODE_ERRORS as err:
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise DecodeError(path, reason) from None
    if complaint is not None and notes is not None:
        notes.append(
            f"{path}: corrupt JPEG data ({complaint}), decoded with the damaged part filled in; "
            "check the image or replace it"
        )
    return array, mode


def decode_warning(path: Path, mode: str, notes: list[str]) -> str | None:
    """One warning for a decoded file: its decode notes and its colour mode, if any."""
    return "; ".join(filter(None, [*notes, mode_warning(path, mode)])) or None


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
        notes: list[str] = []
        try:
            _, mode = decode(path, VERIFY_SIZE, notes)
        except DecodeError as err:
            return str(err), None
        return None, decode_warning(path, mode, notes)

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
