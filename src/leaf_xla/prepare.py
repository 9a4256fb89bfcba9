"""Build or refresh the resize cache: every train and test image decoded once, stored resized.

    python -m leaf_xla.prepare --data-dir data/plant-pathology-2020-fgvc7 --size 512

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

from tqdm import tqdm

from leaf_xla.cli import ArgumentParser, UserError
from leaf_xla.data import (
    LABEL_FORMATS,
    Problems,
    parse_image_size,
    print_warnings,
    read_dataset,
)
from leaf_xla.loader import ResizeCache, default_cache_root


def build_cache(
    cache: ResizeCache, paths: Sequence[Path], workers: int, progress: bool = False
) -> tuple[int, list[str]]:
    """(Re)build the missing and stale entries of `paths`: (how many, warnings).

    Files that cannot be decoded are a UserError naming the first few; the others are kept.
    """
    todo = cache.stale(paths)
    problems = Problems()
    with tqdm(total=len(todo), desc="resizing", unit="img", disable=not (progress and todo)) as bar:
        cache.build(todo, workers, problems, bar.update)
    problems.raise_if_any(f"resize cache {cache.dir}")
    return len(todo), problems.warnings


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m leaf_xla.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="competition folder")
    parser.add_argument(
        "--size",
        type=parse_image_size,
        required=True,
        help="the training --image-size: 512, or HEIGHTxWIDTH such as 512x768",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: <data-dir>/.leaf_xla_cache")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads")
    parser.add_argument("--label-format", choices=LABEL_FORMATS, default="auto")
    parser.add_argument("--classes", nargs="+", help="class names (default: from the data)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")

    data = read_dataset(args.data_dir, args.label_format, args.classes, need_train=False)
    # pp2020 keeps train and test images in one folder: each file once.
    paths = list(dict.fromkeys(data.train.paths + data.test.paths))
    cache = ResizeCache(args.cache_dir or default_cache_root(data.data_dir), args.size)
    built, warnings = build_cache(cache, paths, args.workers, progress=True)
    data.warnings.extend(warnings)
    print_warnings(data)
    counts = f"({len(data.train.paths)} train + {len(data.test.paths)} test)"
    if cache.failed:
        print(f"{cache.dir}: cannot be written; {built} image(s) decoded and checked {counts}")
        return
    print(f"{cache.dir}: {built} image(s) resized, {len(paths) - built} already fresh {counts}")


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
