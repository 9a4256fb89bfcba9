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

`auto` picks `multilabel` for a `labels` column where some row holds several names; a `label`
column, or a `labels` column with one name in every row (as many competitions write single
labels), is `integer` when every label is a whole number or the Cassava name map is there, else
`generic`; no label column is `onehot`.

Each format also names its competition's metric (`metric`, see metrics.py), and the value kind
its submission holds (`writes`): a single-label submission goes in sample_submission.csv's one
label column, whatever its name, and must be the kind of value the sample holds there.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla.errors import UserError, first_few

ID_COLUMNS = ("image_id", "image")
CASSAVA_NAMES = "label_num_to_disease_map.json"
SHOWN = 5  # labels named in one message


def id_column(frame: pd.DataFrame, path: Path) -> str:
    """The image id column of a competition or prediction CSV."""
    for column in ID_COLUMNS:
        if column in frame.columns:
            return column
    raise UserError(f"{path}: no image id column (expected one of {', '.join(ID_COLUMNS)})")


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
    metric = "accuracy"  # the competition's metric (metrics.METRICS), --metric's default
    writes = "names"  # the submission's values: probabilities, names or numbers

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
    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        """The submission's label columns, one row per row of `probs` (columns: the classes)."""


class OneHot(LabelFormat):
    name = "onehot"
    description = "one 0/1 column per class, one class per image, as Plant Pathology 2020"
    probabilities = True
    metric = "auc"
    writes = "probabilities"

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
            table.errors.append(
                f"{table.row(i)}: class values must be 0 or 1 ({first_few(bad, SHOWN)})"
            )
        for i in np.flatnonzero(binary.all(axis=1) & (values.sum(1) != 1)):
            positive = [c for c, v in zip(columns, values[i]) if v == 1]
            table.errors.append(
                f"{table.row(i)}: {len(positive)} positive classes "
                f"({', '.join(positive) or 'none'}), expected exactly 1"
            )
        return np.nan_to_num(values).astype(np.float32), columns

    def label_frame(self, targets: np.ndarray, classes: list[str]) -> pd.DataFrame:
        return pd.DataFrame(targets.astype(int), columns=list(classes))

    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        return probs.reset_index(drop=True)


class MultiLabel(LabelFormat):
    name = "multilabel"
    description = "space-separated class names, any number per image, as Plant Pathology 2021"
    multilabel = True
    metric = "f1_samples"

    def detect(self, frame: pd.DataFrame, data_dir: Path) -> bool:
        return "labels" in frame.columns and not _one_name_per_row(frame)

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

    def submission(self, probs: pd.DataFrame, threshold: float) -> pd.DataFrame:
        # Every class above the threshold, and at least the most probable one.
        names = np.asarray(probs.columns)
        chosen = [names[(row >= threshold) | (row == row.max())] for row in probs.to_numpy()]
        return pd.DataFrame({"labels": [" ".join(c) for c in chosen]})


def _one_name_per_row(frame: pd.DataFrame) -> bool:
    """A `labels` column with at most one space-separated name in every row: single labels."""
    return all(len(str(v).split()) <= 1 for v in frame["labels"].fillna(""))


def _single_label_column(frame: pd.DataFrame) -> str | None:
    """The column holding one label per image: a `labels` column whose every row holds one
    name, else `label`; None when there is none (or `labels` holds several names in a row)."""
    if "labels" in frame.columns:
        return "labels" if _one_name_per_row(frame) else None
    return "label" if "label" in frame.columns else None


def _label_column(table: LabelTable, fmt: str) -> str:
    """The column a single-label format reads (`labels`, as detection looks there first, else
    `label`)."""
    for column in ("labels", "label"):
        if column in table.frame.columns:
            return column
    table.require("label", fmt)  # raises, naming the column expected
    return "label"


def _numbered(frame: pd.DataFrame, data_dir: Path) -> bool:
    """Class numbers (Cassava's layout) rather than names: the name map, or only whole numbers."""
    if (data_dir / CASSAVA_NAMES).is_file():
        return True
    return _whole_numbers(frame[_single_label_column(frame)])


def _whole_numbers(cells: pd.Series) -> bool:
    """Every filled cell a whole number (at least one filled)."""
    texts = [t for t in (str(v).strip() for v in cells.fillna("")) if t]
    numbers = pd.to_numeric(pd.Series(texts, dtype=object), errors="coerce")
    return bool(texts) and bool(numbers.notna().all() and (numbers == numbers.round()).all())


class Integer(LabelFormat):
    name = "integer"
    description = "one class number per image, as Cassava Leaf Disease"
    writes = "numbers"

    def detect(self, frame: pd.DataFrame, data_dir: Path) -> bool:
        return _single_label_column(frame) is not None and _numbered(frame, data_dir)

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
        text = table.text(_label_column(table, self.name))
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
        return _single_label_column(frame) is not None and not _numbered(frame, data_dir)

    def targets(self, table: LabelTable, classes: list[str]) -> tuple[np.ndarray, list[str]]:
        column = _label_column(table, self.name)
        labels = table.text(column)
        for i, label in enumerate(labels):
            if not label:
                table.errors.append(f"{table.row(i)}: empty label (write the class name)")
            elif column == "labels" and len(label.split()) > 1:
                table.errors.append(
                    f"{table.row(i)}: {len(label.split())} labels ({label}) where {self.name} "
                    "takes one; pass --label-format multilabel for several per image"
                )
                labels[i] = ""
        found = sorted({label for label in labels if label}, key=_class_order)
        classes = classes or found
        unknown = sorted(set(found) - set(classes), key=_class_order)
        if unknown:
            raise UserError(
                f"{table.path}: labels {first_few(unknown, SHOWN)} are not in the classes option"
            )
        index = {c: k for k, c in enumerate(classes)}
        values = np.zeros((len(labels), len(classes)), np.float32)
        for i, label in enumerate(labels):
            if label:
                values[i, index[label]] = 1
        return values, classes

    def label_frame(self, targets: np.ndarray, classes: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"label": np.asarray(classes)[targets.argmax(1)]})

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


def value_kind(cells: pd.Series) -> str:
    """What a sample submission's label column holds: numbers, names, or nothing."""
    filled = cells[cells.notna() & (cells.astype(str).str.strip() != "")]
    if filled.empty:
        return "nothing"
    return "numbers" if _whole_numbers(filled) else "names"


def _column_mismatch(path: Path | None, columns: list[str], classes: list[str]) -> str:
    """The error for a sample whose columns are neither the classes nor one label column."""
    extra = [c for c in columns if c not in classes]
    missing = [c for c in classes if c not in columns]
    parts = (
        [f"{first_few(extra, SHOWN)} {'is' if len(extra) == 1 else 'are'} not a class"]
        if extra
        else []
    )
    if missing:
        parts.append(f"class(es) {first_few(missing, SHOWN)} not a column")
    return (
        f"{path}: its columns are neither the classes of train.csv nor one label column "
        f"({'; '.join(parts)}): spell the columns as train.csv spells the classes"
    )


def submission_format(
    sample: pd.DataFrame, path: Path | None, classes: list[str], label_format: str | None = None
) -> LabelFormat:
    """The format that writes the submission sample_submission.csv asks for: probabilities when
    its columns are the classes; for one label column, the data set's format (names for generic
    data, numbers for Cassava's), which must write the kind of value the sample holds there.
    Without a known single-label format, the sample's values decide."""
    columns = [c for c in sample.columns if c != id_column(sample, path)]
    if sorted(columns) == sorted(classes):
        return FORMATS["onehot"]
    if len(columns) != 1:
        raise UserError(_column_mismatch(path, columns, classes))
    column = columns[0]
    kind = value_kind(sample[column])
    fmt = FORMATS.get(label_format or "")
    if fmt is None or fmt.probabilities:  # one-hot data or no train.csv: the sample decides
        if kind == "numbers":
            return FORMATS["integer"]
        return FORMATS["multilabel" if column == "labels" else "generic"]
    numeric_names = all(_whole_numbers(pd.Series([c])) for c in classes)
    writes = "numbers" if fmt.writes == "numbers" or numeric_names else "names"
    if kind not in ("nothing", writes):
        raise UserError(
            f"{path}: column {column!r} holds {kind} (e.g. {sample[column].iloc[0]!r}) but "
            f"train.csv's {fmt.name} labels give class {writes}: write train.csv's labels as "
            "the submission wants them (or Cassava's label_num_to_disease_map.json for numbers)"
        )
    if kind == "names" and writes == "names":
        tokens = {t for v in sample[column].dropna() for t in str(v).split()}
        unknown = sorted(tokens - set(classes))
        if unknown:
            raise UserError(
                f"{path}: column {column!r} holds {first_few(unknown, SHOWN)}, not a class of "
                "train.csv "
                f"({first_few(classes, SHOWN)}): spell the labels as train.csv does"
            )
    return fmt


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
        raise UserError(f"{path}: duplicate ids {first_few(duplicated)}")
    missing = sample_ids[~sample_ids.isin(probs.index)].tolist()
    extra = probs.index.difference(pd.Index(sample_ids), sort=False).tolist()
    if missing or extra:
        what = (
            f"lack ids {first_few(missing)}"
            if missing
            else f"have ids not in it: {first_few(extra)}"
        )
        raise UserError(
            f"the predictions do not match {path}: they {what} "
            f"({len(missing)} missing, {len(extra)} extra); predict the test split again"
        )
    columns = [c for c in sample.columns if c != ids_column]
    fmt = submission_format(sample, path, list(probs.columns), label_format)
    out = fmt.submission(probs.loc[sample_ids], threshold)
    if not fmt.probabilities:  # one label column, named as the sample names it
        out.columns = columns
    out = out[columns]
    out.insert(0, ids_column, sample_ids.to_numpy())
    return out


def submission_example(
    sample: pd.DataFrame | None,
    path: Path | None,
    classes: list[str],
    label_format: str | None,
    test_ids: list[str],
) -> tuple[LabelFormat, list[str]]:
    """What ensemble writes: its format and the CSV's header and first row, for a prediction
    where the first class has 0.7 and the others share the rest. Raises the error ensemble
    would raise."""
    ids = sample[id_column(sample, path)].astype(str).tolist() if sample is not None else []
    ids = ids or test_ids or ["<image id>"]
    example = np.full((1, len(classes)), 0.3 / max(len(classes) - 1, 1))
    example[0, :1] = 0.7
    probs = pd.DataFrame(
        example.round(4),
        index=pd.Index(ids[:1], name="image_id"),
        columns=classes,
    )
    head = None if sample is None else sample.head(1)
    fmt = (
        FORMATS["onehot"]
        if sample is None
        else submission_format(sample, path, classes, label_format)
    )
    lines = format_submission(probs, head, path, 0.5, label_format).to_csv(index=False)
    return fmt, lines.splitlines()
