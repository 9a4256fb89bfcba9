"""The resize cache built ahead (`prepare_cache`): every train and test image decoded once,
stored resized, which also finds the files that do not decode; training and prediction fill the
same cache themselves as they decode (loader.ResizeCache).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from leaf_xla.data import Problems, print_warnings, read_dataset
from leaf_xla.errors import SettingError, not_a_command
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


def prepare_cache(
    data_dir: Path,
    size: int | str,
    cache_dir: Path | None = None,
    workers: int = 1,
    label_format: str = "auto",
    classes: list[str] | None = None,
) -> None:
    """Resize every train and test image of `data_dir` into the cache for `size`."""
    if workers < 1:
        raise SettingError("workers", f"must be at least 1, got {workers}")
    data = read_dataset(data_dir, label_format, classes, need_train=False)
    # pp2020 keeps train and test images in one folder: each file once.
    paths = list(dict.fromkeys(data.train.paths + data.test.paths))
    cache = ResizeCache(cache_dir or default_cache_root(data.data_dir), size)
    built, warnings = build_cache(cache, paths, workers, progress=True)
    data.warnings.extend(warnings)
    print_warnings(data)
    counts = f"({len(data.train.paths)} train + {len(data.test.paths)} test)"
    if cache.failed:
        print(f"{cache.dir}: cannot be written; {built} image(s) decoded and checked {counts}")
        return
    print(f"{cache.dir}: {built} image(s) resized, {len(paths) - built} already fresh {counts}")


if __name__ == "__main__":  # the command is leaf_xla/commands/prepare.py
    not_a_command("leaf_xla.prepare", "prepare")
