"""The host input pipeline: decode (or read the resize cache), augment, batch as uint8.

On a TPU VM the host, not the TPU, usually limits training on big JPEGs, so:
- JPEGs are decoded with DCT scaling to about the target size (data.decode), or read from a
  pre-resized cache (`python -m leaf_xla.prepare`) kept fresh by file size and mtime;
- decoding runs in threads (PIL and numpy release the GIL), no worker processes to fork;
- batches leave as uint8 NCHW: a quarter of the bytes of float32 to copy to the device, where
  the compiled step converts and normalises them;
- every batch has the same shape: training drops the ragged tail, evaluation pads the last
  batch and carries a mask, so nothing recompiles and no sample is lost.
Augmentation is seeded per (seed, epoch, sample), so a batch is the same whatever the thread
timing, and a resumed run sees exactly the batches the killed one would have.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from leaf_xla.cli import UserError
from leaf_xla.data import DecodeError, Problems, decode, mode_warning
from leaf_xla.files import atomic_path, atomic_write_text

MANIFEST = "manifest.json"
SAVE_EVERY = 1000  # images between manifest writes while building


# --- the resize cache -----------------------------------------------------------------------


def default_cache_root(data_dir: Path) -> Path:
    """`<data_dir>/.leaf_xla_cache`, or under ~/.cache when the data folder is read-only."""
    root = data_dir / ".leaf_xla_cache"
    if os.access(data_dir, os.W_OK) or root.is_dir():
        return root
    return (
        Path.home() / ".cache" / "leaf_xla" / str(data_dir.resolve()).strip("/").replace("/", "_")
    )


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class ResizeCache:
    """Pre-resized uint8 arrays (`.npy`), one per source image, valid while size+mtime match."""

    def __init__(self, root: Path, size: int):
        self.dir = root / f"{size}px"
        self.size = size
        manifest = self.dir / MANIFEST
        self.entries: dict[str, list[int]] = (
            json.loads(manifest.read_text()) if manifest.is_file() else {}
        )

    @property
    def exists(self) -> bool:
        return (self.dir / MANIFEST).is_file()

    @staticmethod
    def key(path: Path) -> str:
        # With its folder: train_images/ and test_images/ may hold files of the same name.
        return f"{path.parent.name}/{path.name}"

    def entry(self, path: Path) -> Path:
        return self.dir / f"{self.key(path)}.npy"

    def is_fresh(self, path: Path) -> bool:
        try:
            return self.entries.get(self.key(path)) == _stamp(path) and self.entry(path).is_file()
        except FileNotFoundError:
            return False

    def stale(self, paths: Sequence[Path]) -> list[Path]:
        return [p for p in paths if not self.is_fresh(p)]

    def build(
        self,
        paths: Sequence[Path],
        workers: int,
        problems: Problems,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """(Re)build the entries of `paths` that are missing or stale; returns how many.

        Every rebuilt file is decoded, so this is also the expensive validation:
        undecodable files land in `problems.errors`, odd colour modes in its warnings.
        """
        todo = self.stale(paths)

        def one(path: Path) -> tuple[list[int] | None, str | None, str | None]:
            try:
                stamp = _stamp(path)  # before decoding: a file changed meanwhile stays stale
                array, mode = decode(path, self.size)
            except DecodeError as err:
                return None, str(err), None
            except FileNotFoundError:
                return None, f"{path}: missing image file", None
            with atomic_path(self.entry(path)) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array)
            return stamp, None, mode_warning(path, mode)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for done, (path, (stamp, error, warning)) in enumerate(
                zip(todo, pool.map(one, todo)), start=1
            ):
                if stamp is None:
                    problems.errors.append(error)
                    problems.bad_files.add(path)
                    self.entries.pop(self.key(path), None)
                else:
                    self.entries[self.key(path)] = stamp
                if warning:
                    problems.warnings.append(warning)
                if progress:
                    progress(1)
                if done % SAVE_EVERY == 0:
                    self.save()  # a build killed half way keeps what it made
        self.save()
        return len(todo)

    def save(self) -> None:
        atomic_write_text(self.dir / MANIFEST, json.dumps(self.entries))


# --- samples and batches --------------------------------------------------------------------


class LeafImages:
    """Images by `(position, aug_seed)`, as uint8 CHW, written straight into a batch array.

    Positions past the end are padding: a zero image, masked out, so an evaluation batch keeps
    its shape. `aug_seed` None means no augmentation (evaluation, prediction). With `skip_bad`,
    a training image that cannot be decoded becomes a masked zero image too; an evaluation
    image never does (its score or prediction would be invented).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        targets: np.ndarray | None,
        size: int,
        transform_factory: Callable | None = None,
        cache: ResizeCache | None = None,
        num_classes: int = 0,
        skip_bad: bool = False,
    ):
        self.paths = list(paths)
        self.skip_bad = skip_bad
        self.targets = targets
        self.size = size
        self.num_classes = num_classes if targets is None else targets.shape[1]
        self.transform_factory = transform_factory
        self.cache = cache if cache is not None and cache.size == size else None
        self.fresh = (
            set()
            if self.cache is None
            else {i for i, p in enumerate(self.paths) if self.cache.is_fresh(p)}
        )
        self._local = threading.local()  # one albumentations Compose per thread: it has RNG state

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, position: int) -> np.ndarray:
        """The resized HWC image, from the cache when its entry is fresh."""
        if position in self.fresh:
            return np.load(self.cache.entry(self.paths[position]))
        return decode(self.paths[position], self.size)[0]

    def image(self, position: int, aug_seed: int | None) -> np.ndarray:
        """The HWC image at `position`, augmented with the transform seeded by `aug_seed`."""
        image = self.load(position)
        if aug_seed is not None and self.transform_factory is not None:
            transform = getattr(self._local, "transform", None)
            if transform is None:
                transform = self._local.transform = self.transform_factory()
            transform.set_random_seed(aug_seed)
            image = transform(image=image)["image"]
        return image

    def fill(self, key: tuple[int, int | None], out: np.ndarray) -> bool:
        """Write sample `key` into `out` (3, size, size): one copy, HWC to CHW. False: the
        sample is padding or was skipped as unreadable (a zero image)."""
        position, aug_seed = key
        if position >= len(self.paths):
            out[...] = 0
            return False
        try:
            out[...] = self.image(position, aug_seed).transpose(2, 0, 1)
        except DecodeError as err:
            if not self.skip_bad:
                raise
            if aug_seed is None:
                raise DecodeError(
                    err.path,
                    f"{err.reason}; --skip-bad-images skips training images only, "
                    "so replace or remove this one",
                ) from None
            out[...] = 0
            return False
        return True

    def labels(
        self, keys: Sequence[tuple[int, int | None]], filled: Sequence[bool]
    ) -> dict[str, torch.Tensor]:
        """A batch's target, index (-1: padding) and mask (0: padding or a skipped image)."""
        positions = np.array([k[0] for k in keys])
        real = positions < len(self.paths)
        target = np.zeros((len(keys), self.num_classes), np.float32)
        if self.targets is not None:
            target[real] = self.targets[positions[real]]
        return {
            "target": torch.from_numpy(target),
            "index": torch.from_numpy(np.where(real, positions, -1).astype(np.int32)),
            "mask": torch.from_numpy(np.array(filled, np.float32)),
        }


def train_batches(
    n: int, batch_size: int, loaders: int, rank: int, seed: int, epoch: int, start_batch: int = 0
) -> list[list[tuple[int, int]]]:
    """This loader's batches of one epoch: a seeded shuffle, ragged tail dropped, split by rank.

    Every loader gets the same number of full batches. `start_batch` skips what a resumed run
    has already trained on.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_step = batch_size * loaders
    steps = n // per_step
    if steps == 0:
        raise UserError(
            f"{n} training images are fewer than one global batch of {per_step} "
            f"({batch_size} per replica x {loaders}); lower --batch-size"
        )
    mine = order[: steps * per_step][rank::loaders]
    aug_seeds = np.random.default_rng([seed, epoch, 1]).integers(0, 2**31, size=n)
    samples = [(int(i), int(aug_seeds[i])) for i in mine]
    return [samples[s * batch_size : (s + 1) * batch_size] for s in range(start_batch, steps)]


def eval_batches(n: int, batch_size: int, loaders: int, rank: int) -> list[list[tuple[int, None]]]:
    """Every sample exactly once across loaders, padded so that all batches are full."""
    per_step = batch_size * loaders
    padded = -(-n // per_step) * per_step
    mine = list(range(padded))[rank::loaders]
    return [[(i, None) for i in mine[s : s + batch_size]] for s in range(0, len(mine), batch_size)]


class BatchLoader:
    """Iterate batches (image uint8 NCHW, target, index, mask), `prefetch` batches ahead.

    Threads write each image into its slot of a fresh batch array: no per-sample tensors to
    stack. A batch array is never reused: the consumer (an XLA upload thread) may still hold it.
    """

    def __init__(
        self,
        dataset: LeafImages,
        batches: list[list[tuple[int, int | None]]],
        workers: int = 4,
        prefetch: int = 4,
    ):
        self.dataset = dataset
        self.batches = batches
        self.workers = max(1, workers)
        self.prefetch = max(1, prefetch)
        self.skipped: list[int] = []  # positions skipped as unreadable, in the order seen

    def __len__(self) -> int:
        return len(self.batches)

    def _submit(self, pool: ThreadPoolExecutor, keys: list) -> tuple[list, np.ndarray, list]:
        size = self.dataset.size
        images = np.empty((len(keys), 3, size, size), np.uint8)
        futures = [pool.submit(self.dataset.fill, k, images[j]) for j, k in enumerate(keys)]
        return keys, images, futures

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="leaf-loader") as pool:
            upcoming = iter(self.batches)
            pending = deque(self._submit(pool, keys) for keys in islice(upcoming, self.prefetch))
            while pending:
                keys, images, futures = pending.popleft()
                # .result() re-raises a decode error here, in the training loop.
                filled = [future.result() for future in futures]
                n = len(self.dataset)
                self.skipped += [k[0] for k, ok in zip(keys, filled) if not ok and k[0] < n]
                following = next(upcoming, None)
                if following is not None:
                    pending.append(self._submit(pool, following))
                yield {"image": torch.from_numpy(images), **self.dataset.labels(keys, filled)}
