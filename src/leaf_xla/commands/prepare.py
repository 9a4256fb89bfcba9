"""Build or refresh the resize cache: every train and test image decoded once, stored resized.

    leaf-xla prepare --data-dir data/plant-pathology-2020-fgvc7 --size 512

Training and prediction fill the same cache themselves as they decode (`--cache auto`); this
fills it ahead, and decodes every image once, which also finds the files that do not decode.
They find the cache on their own (<data-dir>/.leaf_xla_cache/<size>px, or --cache-dir), and an
entry whose image has changed since (size or modification time) is rebuilt, never trusted.
Running this again only redoes what is missing or stale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands.options import add_data_source_options
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.settings import check_data_dir, parse_image_size


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla prepare", description=__doc__.split("\n\n")[0])
    add_data_source_options(parser, required=True)
    parser.add_argument(
        "--size",
        type=parse_image_size,
        required=True,
        help="the training --image-size: 512, or HEIGHTxWIDTH such as 512x768",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: <data-dir>/.leaf_xla_cache")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_data_dir(args.data_dir)
    from leaf_xla.prepare import prepare_cache

    prepare_cache(
        args.data_dir,
        args.size,
        cache_dir=args.cache_dir,
        workers=args.workers,
        label_format=args.label_format,
        classes=args.classes,
    )
