"""Validate a data directory and print a report: layout, label format, classes, counts, and every
problem found, each offending file or CSV row named.

    leaf-xla check --data-dir data/plant-pathology-2021-fgvc8

Exit code 0 when there is no error (warnings allowed), 1 when there are errors. Besides the
checks every training run makes (CSV columns and labels, ids, files present and complete), this
decodes every image once, which takes a while on a big set; --no-decode skips that.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from leaf_xla.commands.options import add_data_source_options
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.settings import check_data_dir


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla check", description=__doc__.split("\n\n")[0])
    add_data_source_options(parser, required=True)
    parser.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_data_dir(args.data_dir)
    from leaf_xla.check import check_data

    problems = check_data(
        args.data_dir,
        label_format=args.label_format,
        classes=args.classes,
        decode=not args.no_decode,
        workers=args.workers,
    )
    if problems.errors:
        sys.exit(1)
