"""Validate a data directory and print a report: layout, label format, classes, counts, and every
problem found, each offending file or CSV row named.

    leaf-xla check --data-dir data/plant-pathology-2021-fgvc8

Exit code 0 when there is no error (warnings allowed), 1 when there are errors. Besides the
checks every training run makes (CSV columns and labels, ids, files present and complete), this
decodes every image once, which takes a while on a big set; --no-decode skips that.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm import tqdm

from leaf_xla.data import DataSet, Problems, scan, verify_images
from leaf_xla.errors import UserError, not_a_command
from leaf_xla.formats import FORMATS, submission_example


def _header(data: DataSet, csv: str) -> list[str]:
    return list(pd.read_csv(data.data_dir / csv, nrows=0).columns) if csv else []


def submission_lines(data: DataSet) -> list[str]:
    """What ensemble will write, header and one row, in sample_submission.csv's shape when
    there is one; a UserError where that shape does not fit the classes or the labels."""
    sample = data.sample_submission
    path = data.data_dir / "sample_submission.csv"
    fmt, lines = submission_example(sample, path, data.classes, data.label_format, data.test.ids)
    what = {
        "probabilities": "one probability column per class",
        "names": "the class names above the threshold, at least the top one"
        if fmt.multilabel
        else "the top class's name",
        "numbers": "the top class's number",
    }[fmt.writes]
    source = f"the shape of {path.name}" if sample is not None else "no sample_submission.csv"
    return [f"submission ({source}): {what}", *(f"  {line}" for line in lines)]


def describe(data: DataSet) -> list[str]:
    """The report's summary lines: where things were found and how many of each class."""
    train, test = data.train, data.test
    fmt = FORMATS.get(data.label_format)
    lines = [f"label format: {fmt.name} ({fmt.description})" if fmt else "label format: unknown"]
    if fmt is not None and not fmt.multilabel and "labels" in _header(data, train.csv):
        lines.append(
            "  one name in every row of the 'labels' column: single-label "
            "(--label-format multilabel if an image may have several)"
        )
    if train.csv:
        lines.append(
            f"train: {train.csv} (id column {data.id_column}), images in {train.image_dir.name}/"
        )
    else:
        lines.append("train: no train.csv (prediction only)")
    if test.csv:
        lines.append(f"test: ids from {test.csv}, images in {test.image_dir.name}/")
    else:
        lines.append("test: no test.csv or sample_submission.csv (training only)")
    lines.append(f"classes: {len(data.classes)}")
    if train.csv:
        counts = train.targets.sum(0).astype(int)
        width = max(map(len, data.classes), default=0)
        lines += [f"  {c:<{width}}  {n:6d}" for c, n in zip(data.classes, counts)]
        lines.append(f"train images: {len(train.ids)}")
        if data.multilabel:
            several = int((train.targets.sum(1) > 1).sum())
            lines.append(f"  with more than one label: {several}")
    lines.append(f"test images: {len(test.ids)}")
    return lines


def check_data(
    data_dir: Path,
    label_format: str = "auto",
    classes: list[str] | None = None,
    decode: bool = True,
    workers: int = 1,
) -> Problems:
    """Print the report on `data_dir` (layout, classes, counts, the submission's shape, every
    problem found); returns the problems (errors make it unusable for training)."""
    data, problems = scan(data_dir, label_format, classes, need_train=False)
    print(f"data directory: {data_dir}")
    if data is not None:
        if not data.train.csv:
            # As train will: it stops on a folder without train.csv (predict can still run).
            problems.errors.append(
                f"{data_dir}: no train.csv, so train cannot run on it (predict can)"
            )
        print("\n".join(describe(data)))
        try:
            print("\n".join(submission_lines(data)))
        except UserError as err:
            problems.errors.append(str(err))
        if not decode:
            print("decode check: skipped (--no-decode)")
        else:
            paths = list(dict.fromkeys(data.train.paths + data.test.paths))
            todo = [p for p in paths if p not in problems.bad_files]
            with tqdm(total=len(todo), desc="decoding", unit="img", disable=len(todo) < 500) as bar:
                verify_images(todo, problems, max(1, workers), bar.update)
            print(f"decode check: {len(todo)} image(s) decoded")
    report(problems)
    return problems


def report(problems: Problems) -> None:
    for kind, items in (("error", problems.errors), ("warning", problems.warnings)):
        if items:
            print(f"\n{len(items)} {kind}(s):")
            print("\n".join(f"  {kind}: {item}" for item in items))
    verdict = "NOT usable for training" if problems.errors else "OK"
    print(f"\n{verdict}: {len(problems.errors)} error(s), {len(problems.warnings)} warning(s)")


if __name__ == "__main__":  # the command is leaf_xla/commands/check.py
    not_a_command("leaf_xla.check", "check")
