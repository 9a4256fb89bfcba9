"""Label formats: how train.csv holds the labels, and how a submission is written.

Each format is one entry of `FORMATS`, and adding a data set format is one new entry here plus
its test. An entry knows its name (`--label-format`), how train.csv's columns announce it, how
its labels become targets (an (N, C) one- or multi-hot float array) and which rows are wrong,
whether it is multi-label (sigmoid + binary cross-entropy instead of softmax + cross-entropy),
a line for `check`, and how labels are written back: train.csv's label columns (`synth`) and
the submission's (`ensemble`).

- onehot: one 0/1 column per class, one class per image (Plant Pathology 2020,
  `image_id,healthy,multiple_diseases,rust,scab`); the submission holds the probabilities;
- multilabel: a `labels` column of space-separated class names (Plant Pathology 2021,
  `image,labels`); the submission lists the classes above `--threshold` (at least the top one);
- integer: a `label` column of class numbers 0..C-1 (Cassava 2020, `image_id,label`), names
  from `label_num_to_disease_map.json` or `--classes`; the submission holds the class number;
- generic: a `label` column of class names (any image-classification competition,
  `image_id,label`; numbers are names too with `--label-format generic`). The classes are the
  distinct labels, sorted (numerically when they are all numbers), or `--classes` in that
  order; the submission holds the top class's name, exactly as train.csv writes it.

`auto` picks `multilabel` for a `labels` column; for a `label` column, `integer` when every
label is a whole number or the Cassava name map is there, else `generic`; else `onehot`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla.cli import UserError

ID_COLUMNS = ("image_id", "image")
CASSAVA_NAMES = "label_num_to_disease_map.json"
SHOWN = 5  # labels named in one message
IDS_SHOWN = 3  # ids named in one message about a submission


def id_column(frame: pd.DataFrame, path: Path) -> str:
    """The image id column of a competition or prediction CSV."""
    for column in ID_COLUMNS:
        if column in frame.columns:
            return column
    raise UserError(f"{path}: no image id column (expected one of {', '.join(ID_COLUMNS)})")


def _first(values: list[str], shown: int = SHOWN) -> str:
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return ", ".join(map(str, values[:shown])) + more


@dataclass
class LabelTable:
    """train.csv being read: what a format needs to turn its label columns into targets."""

    frame: pd.DataFrame
    path: Path
    id_column: str
    data_dir: Path
    errors: list[str]  # one per offending row, reported together
    warnings: list[str]

    def line(self, index: int) -> str:
        # The CSV line number (the header is line 1) and the id: what a user searches for.
        return f"row {index + 2} ({self.frame[self.id_column].iloc[index]})"

    def row(self, index: int) -> str:
        return f"{self.path.name} {self.line(index)}"

    def text(self, column: str) -> list[str]:
        return [str(v).strip() for v in self.frame[column].fillna("")]

    def require(self, column: str, fmt: str) -> None:
        if column not in self.frame.columns:
            raise UserError(f"{self.path}: label format {fmt} needs a {column!r} column")


class LabelFormat(ABC):
    """One way of writing labels; the subclasses below are the registry's entries."""

    name = ""
    description = ""  # one line for `check`
    multilabel = False  # sigmoid + BCE, several classes per image
    probabilities = False  # the submission holds probabilities (so ranks may be averaged)

    @abstractmethod
    def detect(self, frame: pd.DataFrame, data_dir: Path) -> bool:
        """Whether train.csv's columns (and, where they are ambiguous, values) are this format."""

    @abstractmethod
    def targets(self, table: LabelTable, classes: list[str]) -> tuple[np.ndarray, list[str]]:
        """(N, C) float32 targets and the class names; bad rows go to `table.errors`."""

    @abstractmethod
    def label_frame(self, targets: np.ndarray, classes: list[str]) -> pd.DataFrame:
        """train.csv's label columns for (N, C) 0/1 targets: the inverse of `targets`."""

    @abstractmethod
    def submission_columns(self, classes: list[str]) -> list[str]:
        """The submission's columns after the id."""

    @abstractmethod
    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        """The submission's label columns, one row per row of `probs` (columns: the classes)."""


class OneHot(LabelFormat):
    name = "onehot"
    description = "one 0/1 column per class, one class per image, as Plant Pathology 2020"
    probabilities = True

    def detect(self, frame: pd.DataFrame, data_dir: Path) -> bool:
        return not {"label", "labels"} & set(frame.columns)

    def _class_columns(self, table: LabelTable, classes: list[str]) -> list[str]:
        if classes:
            missing = [c for c in classes if c not in table.frame.columns]
            if missing:
                raise UserError(f"{table.path}: class column(s) {', '.join(missing)} not found")
            return list(classes)
        columns = []
        for column in (c for c in table.frame.columns if c not in ID_COLUMNS):
            cells = table.frame[column]
            filled = cells[cells.notna() & (cells.astype(str).str.strip() != "")]
            numbers = pd.to_numeric(filled, errors="coerce")
            if len(filled) and numbers.isna().all():
                # Text where 0/1 belongs (a `source` column added when merging data): not a class.
                table.warnings.append(
                    f"{table.path.name}: column {column!r} holds text, not 0/1 labels: ignored "
                    "(name the class columns with --classes to choose them)"
                )
            elif len(filled) and not numbers.isin((0, 1)).any():
                raise UserError(
                    f"{table.path}: column {column!r} is not a 0/1 class column (values such as "
                    f"{filled.iloc[0]!r}); name the class columns with --classes"
                )
            else:
                columns.append(column)
        return columns

    def targets(self, table: LabelTable, classes: list[str]) -> tuple[np.ndarray, list[str]]:
        columns = self._class_columns(table, classes)
        if len(columns) < 2:
            raise UserError(
                f"{table.path}: expected at least two class columns after the id column"
            )
        frame = table.frame[columns]
        values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(float)
        binary = np.isin(values, (0, 1))
        for i in np.flatnonzero(~binary.all(axis=1)):
            bad = [f"{c}: {frame[c].iloc[i]!r}" for c, ok in zip(columns, binary[i]) if not ok]
            table.errors.append(f"{table.row(i)}: class values must be 0 or 1 ({_first(bad)})")
        for i in np.flatnonzero(binary.all(axis=1) & (values.sum(1) != 1)):
            positive = [c for c, v in zip(columns, values[i]) if v == 1]
            table.errors.append(
                f"{table.row(i)}: {len(positive)} positive classes "
                f"({', '.join(positive) or 'none'}), expected exactly 1"
            )
        return np.nan_to_num(values).astype(np.float32), columns

    def label_frame(self, targets: np.ndarray, classes: list[str]) -> pd.DataFrame:
        return pd.DataFrame(targets.astype(int), columns=list(classes))

    def submission_columns(self, classes: list[str]) -> list[str]:
        return list(classes)

    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        return probs.reset_index(drop=True)


class MultiLabel(LabelFormat):
    name = "multilabel"
    description = "space-separated class names, any number per image, as Plant Pathology 2021"
    multilabel = True

    def detect(self, frame: pd.DataFrame, data_dir: Path) -> bool:
        return "labels" in frame.columns

    def targets(self, table: LabelTable, classes: list[str]) -> tuple[np.ndarray, list[str]]:
        table.require("labels", self.name)
        tokens = [text.split() for text in table.text("labels")]
        for i in (i for i, t in enumerate(tokens) if not t):
            table.errors.append(
                f"{table.row(i)}: empty labels (write 'healthy' or the disease names)"
            )
        found = sorted({t for row in tokens for t in row})
        classes = classes or found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(
                f"{table.path}: labels {', '.join(unknown)} are not in the classes option"
            )
        index = {c: k for k, c in enumerate(classes)}
        values = np.zeros((len(tokens), len(classes)), np.float32)
        for i, row in enumerate(tokens):
            values[i, [index[t] for t in row]] = 1
        return values, classes

    def label_frame(self, targets: np.ndarray, classes: list[str]) -> pd.DataFrame:
        names = np.asarray(classes)
        return pd.DataFrame({"labels": [" ".join(names[row > 0]) for row in targets]})

    def submission_columns(self, classes: list[str]) -> list[str]:
        return ["labels"]

    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        # Every class above the threshold, and at least the most probable one.
        names = np.asarray(probs.columns)
        chosen = [names[(row >= threshold) | (row == row.max())] for row in probs.to_numpy()]
        return pd.DataFrame({"labels": [" ".join(c) for c in chosen]})


def _label_column(frame: pd.DataFrame) -> bool:
    """A single-label `label` column (a `labels` column is multi-label)."""
    return "label" in frame.columns and "labels" not in frame.columns


def _numbered(frame: pd.DataFrame, data_dir: Path) -> bool:
    """Class numbers (Cassava's layout) rather than names: the name map, or only whole numbers."""
    if (data_dir / CASSAVA_NAMES).is_file():
        return True
    texts = [t for t in (str(v).strip() for v in frame["label"].fillna("")) if t]
    numbers = pd.to_numeric(pd.Series(texts, dtype=object), errors="coerce")
    return bool(numbers.notna().all() and (numbers == numbers.round()).all())


class Integer(LabelFormat):
    name = "integer"
    description = "one class number per image, as Cassava Leaf Disease"

    def detect(self, frame: pd.DataFrame, data_dir: Path) -> bool:
        return _label_column(frame) and _numbered(frame, data_dir)

    def _names(self, table: LabelTable, labels: np.ndarray, whole: np.ndarray) -> list[str]:
        mapping = table.data_dir / CASSAVA_NAMES
        if mapping.is_file():
            try:
                names = json.loads(mapping.read_text())
                return [str(names[str(k)]) for k in range(len(names))]
            except (ValueError, KeyError, TypeError):
                raise UserError(
                    f'{mapping}: expected {{"0": "name", "1": ...}} numbered from 0'
                ) from None
        # Names are the numbers found; a gap means a typo (a 40 among 0..4 would make 41 classes).
        top = int(labels[whole].max()) if whole.any() else -1
        counts = np.bincount(labels[whole].astype(int), minlength=top + 1)
        unused = np.flatnonzero(counts == 0)
        if unused.size:
            raise UserError(
                f"{table.path}: no row has label {', '.join(map(str, unused[:SHOWN]))} but one "
                f"has {top} ({table.line(int(np.flatnonzero(labels == top)[0]))}): fix the label, "
                f"or name the classes in {CASSAVA_NAMES} or --classes"
            )
        return [str(k) for k in range(top + 1)]

    def targets(self, table: LabelTable, classes: list[str]) -> tuple[np.ndarray, list[str]]:
        table.require("label", self.name)
        text = table.text("label")
        labels = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(float)
        whole = np.isfinite(labels) & (labels == np.round(labels)) & (labels >= 0)
        classes = classes or self._names(table, labels, whole)
        bad = ~(whole & (labels < len(classes)))
        for i in np.flatnonzero(bad):
            table.errors.append(
                f"{table.row(i)}: label {text[i]!r} is not one of 0..{len(classes) - 1}"
            )
        values = np.zeros((len(text), len(classes)), np.float32)
        rows = np.flatnonzero(~bad)
        values[rows, labels[rows].astype(int)] = 1
        return values, classes

    def label_frame(self, targets: np.ndarray, classes: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"label": targets.argmax(1)})

    def submission_columns(self, classes: list[str]) -> list[str]:
        return ["label"]

    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        return pd.DataFrame({"label": probs.to_numpy().argmax(1)})


def _class_order(name: str) -> tuple:
    """Numbers in numeric order ("2" before "10"), then names in alphabetical order."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


class Generic(LabelFormat):
    name = "generic"
    description = "one class name per image in a 'label' column, as any image competition"

    def detect(self, frame: pd.DataFrame, data_dir: Path) -> bool:
        return _label_column(frame) and not _numbered(frame, data_dir)

    def targets(self, table: LabelTable, classes: list[str]) -> tuple[np.ndarray, list[str]]:
        table.require("label", self.name)
        labels = table.text("label")
        for i in (i for i, label in enumerate(labels) if not label):
            table.errors.append(f"{table.row(i)}: empty label (write the class name)")
        found = sorted({label for label in labels if label}, key=_class_order)
        classes = classes or found
        unknown = sorted(set(found) - set(classes), key=_class_order)
        if unknown:
            raise UserError(f"{table.path}: labels {_first(unknown)} are not in the classes option")
        index = {c: k for k, c in enumerate(classes)}
        values = np.zeros((len(labels), len(classes)), np.float32)
        for i, label in enumerate(labels):
            if label:
                values[i, index[label]] = 1
        return values, classes

    def label_frame(self, targets: np.ndarray, classes: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"label": np.asarray(classes)[targets.argmax(1)]})

    def submission_columns(self, classes: list[str]) -> list[str]:
        return ["label"]

    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        return pd.DataFrame({"label": np.asarray(probs.columns)[probs.to_numpy().argmax(1)]})


FORMATS: dict[str, LabelFormat] = {
    f.name: f for f in (OneHot(), MultiLabel(), Integer(), Generic())
}
LABEL_FORMATS = ("auto", *FORMATS)  # the --label-format choices


def get(name: str) -> LabelFormat:
    """The format called `name` (as stored in a checkpoint or given as --label-format)."""
    if name not in FORMATS:
        raise UserError(f"label_format must be one of {', '.join(FORMATS)}, got {name!r}")
    return FORMATS[name]


def detect(frame: pd.DataFrame, data_dir: Path) -> LabelFormat:
    """The format train.csv is written in (the entries' rules exclude each other)."""
    return next(f for f in FORMATS.values() if f.detect(frame, data_dir))


def submission_format(
    columns: list[str], classes: list[str], path: Path | None, label_format: str | None = None
) -> LabelFormat:
    """The format whose submission has `columns` (sample_submission.csv's, less the id): the
    data set's own first, so that a `label` column gets names for generic data and numbers
    for Cassava's."""
    first = [FORMATS[label_format]] if label_format in FORMATS else []
    for fmt in [*first, *FORMATS.values()]:
        if sorted(fmt.submission_columns(classes)) == sorted(columns):
            return fmt
    others = sorted(
        {c for f in FORMATS.values() if not f.probabilities for c in f.submission_columns(classes)}
    )
    raise UserError(
        f"{path}: columns {columns} are neither the classes {classes} nor "
        + " / ".join(map(repr, others))
    )


def format_submission(
    probs: pd.DataFrame,
    sample: pd.DataFrame | None,
    path: Path | None,
    threshold: float = 0.5,
    label_format: str | None = None,
) -> pd.DataFrame:
    """The submission in sample_submission.csv's shape (its ids, order and columns), written by
    the format its columns call for; without a sample, the probabilities as they are."""
    if sample is None:
        return probs.reset_index()
    ids_column = id_column(sample, path)
    sample_ids = sample[ids_column].astype(str)
    duplicated = sample_ids[sample_ids.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(f"{path}: duplicate ids {_first(duplicated, IDS_SHOWN)}")
    missing = sample_ids[~sample_ids.isin(probs.index)].tolist()
    extra = probs.index.difference(pd.Index(sample_ids), sort=False).tolist()
    if missing or extra:
        what = (
            f"lack ids {_first(missing, IDS_SHOWN)}"
            if missing
            else f"have ids not in it: {_first(extra, IDS_SHOWN)}"
        )
        raise UserError(
            f"the predictions do not match {path}: they {what} "
            f"({len(missing)} missing, {len(extra)} extra); predict the test split again"
        )
    columns = [c for c in sample.columns if c != ids_column]
    fmt = submission_format(columns, list(probs.columns), path, label_format)
    out = fmt.submission(probs.loc[sample_ids], threshold)[columns]
    out.insert(0, ids_column, sample_ids.to_numpy())
    return out
