"""The host input pipeline: decode (or read the resize cache), augment, batch as uint8.

On a TPU VM the host, not the TPU, usually limits training on big JPEGs, so:
- JPEGs are decoded with DCT scaling to about the target size (data.decode) only once: the
  first epoch that decodes an image also writes its resized copy into the resize cache, which
  later epochs and later runs at that size read (`leaf-xla prepare` fills it ahead);
  while the host has memory to spare, the resized images also stay in RAM after the first epoch;
- decoding runs in threads (libjpeg-turbo, torch and numpy release the GIL), no worker processes;
- batches leave as uint8 NCHW: a quarter of the bytes of float32 to copy to the device, where
  the compiled step converts and normalises them;
- every batch has the same shape: training drops the ragged tail, evaluation pads the last
  batch and carries a mask, so nothing recompiles and no sample is lost.
Augmentation is seeded per (seed, epoch, sample), so a batch is the same whatever the thread
timing, and a resumed run sees exactly the batches the killed one would have. A cached image is
the decoded array itself, so where an image comes from never changes a batch.
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from leaf_xla.data import DecodeError, Problems, decode, decode_warning
from leaf_xla.errors import UserError
from leaf_xla.files import fsync_path
from leaf_xla.settings import image_shape, parse_image_size

# Every tensor of a batch, with its number of dimensions: the SPMD backend shards each along its
# first. The loader's, then the mixing parameters that --mixup/--cutmix add (mix.py).
BATCH_DIMS = {"image": 4, "target": 2, "index": 1, "mask": 1, "mix_lam": 1, "mix_box": 2}

# Resized images stay in RAM while the host has more than this share of its memory available
# (checked as /proc/meminfo's MemAvailable, so that the processes of one host share it), and,
# in a container, while its memory cgroup uses less than 1 - this share of its limit.
RAM_FLOOR = 0.5
RAM_RECHECK = 256 << 20  # bytes kept between two looks at /proc/meminfo
# A cache temp file older than this (seconds) is a killed writer's: a live write takes far less.
TEMP_AGE = 3600

Stamp = tuple[int, int]


# --- the resize cache -----------------------------------------------------------------------


def default_cache_root(data_dir: Path) -> Path:
    """`<data_dir>/.leaf_xla_cache`, or under ~/.cache when the data folder is read-only."""
    root = data_dir / ".leaf_xla_cache"
    if os.access(data_dir, os.W_OK) or root.is_dir():
        return root
    return (
        Path.home() / ".cache" / "leaf_xla" / str(data_dir.resolve()).strip("/").replace("/", "_")
    )


def _stamp(path: Path) -> Stamp:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class ResizeCache:
    """Resized uint8 arrays (`.npy`), one per source image and size, written as they are decoded.

    An entry is `<size>px/<folder>/<file name>/<bytes>-<mtime_ns>.npy` (`512px` for a square,
    `480x768px` for height x width): named by its source's
    size and modification time, so a changed image never matches its old entry, and no manifest
    has to be shared by the processes that fill the cache at once. Each entry is serialised in
    memory, written with checked writes to a temp file whose name no other writer (process,
    thread or host on a shared disk) can hold, fsynced, renamed into place, and its folder
    fsynced: a reader sees a whole entry or none, after a kill, a full disk or a power cut too.
    An entry of the wrong byte size, or one that does not load, is a miss and is written again.
    A cache that cannot be written is one warning; images are then decoded every epoch.
    """

    def __init__(self, root: Path, size: int | str):
        self.dir = root / f"{parse_image_size(size)}px"
        self.size = size
        self.shape = image_shape(size)
        self.failed: str | None = None  # why the first write that failed did (then no more)
        self._lock = threading.Lock()
        self._entry_bytes: int | None = None

    @staticmethod
    def key(path: Path) -> str:
        # With its folder: train_images/ and test_images/ may hold files of the same name.
        return f"{path.parent.name}/{path.name}"

    def entry(self, path: Path, stamp: Stamp | None = None) -> Path:
        size, mtime = stamp or _stamp(path)
        return self.dir / self.key(path) / f"{size}-{mtime}.npy"

    @property
    def entry_bytes(self) -> int:
        """The size of every whole entry (the .npy header is the same for one shape)."""
        if self._entry_bytes is None:
            buffer = io.BytesIO()
            np.save(buffer, np.zeros((*self.shape, 3), np.uint8))
            self._entry_bytes = buffer.tell()
        return self._entry_bytes

    def is_fresh(self, path: Path) -> bool:
        """The entry of `path` is there, whole (an empty or cut-short file is stale)."""
        try:
            return self.entry(path).stat().st_size == self.entry_bytes
        except (FileNotFoundError, NotADirectoryError):
            return False

    def stale(self, paths: Sequence[Path]) -> list[Path]:
        return [p for p in paths if not self.is_fresh(p)]

    def read(self, path: Path) -> tuple[np.ndarray | None, Stamp]:
        """(the entry of `path` or None, the stamp it was looked up by: stat before decoding,
        so that a file changed meanwhile stays stale). FileNotFoundError: no source file."""
        stamp = _stamp(path)
        try:
            array = np.load(self.entry(path, stamp))
        except (OSError, ValueError, EOFError):  # missing, empty or torn: decoded and rewritten
            return None, stamp
        if array.shape != (*self.shape, 3) or array.dtype != np.uint8:
            return None, stamp
        return array, stamp

    def write(self, path: Path, array: np.ndarray, stamp: Stamp) -> None:
        """Install the entry of `path` (OSError where the cache cannot be written)."""
        final = self.entry(path, stamp)
        final.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, array)
        tmp = _write_temp(final.parent, buffer.getbuffer())
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(final.parent)
        _remove_leftovers(final.parent, keep=final)

    def store(self, path: Path, array: np.ndarray, stamp: Stamp) -> None:
        """`write`, where a failure is only slower: warn once, then write no more."""
        if self.failed is not None:
            return
        try:
            self.write(path, array, stamp)
        except OSError as err:
            with self._lock:
                if self.failed is None:
                    self.failed = err.strerror or str(err)
                    print(
                        f"warning: resize cache {self.dir}: cannot write ({self.failed}); "
                        "images are decoded every epoch",
                        file=sys.stderr,
                    )

    def remove_stale_temps(self) -> None:
        """Delete the temp files that killed writers left (old enough not to be in flight)."""
        for folder in {tmp.parent for tmp in self.dir.glob("*/*/.*.tmp")}:
            _remove_leftovers(folder)

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
        A cache that cannot be written is a warning (`failed`); the files are still checked.
        """
        todo = self.stale(paths)
        if self.dir.is_dir():
            self.remove_stale_temps()

        def one(path: Path) -> tuple[str | None, str | None]:
            notes: list[str] = []
            try:
                stamp = _stamp(path)  # before decoding: a file changed meanwhile stays stale
                array, mode = decode(path, self.size, notes)
            except DecodeError as err:
                return str(err), None
            except FileNotFoundError:
                return f"{path}: missing image file", None
            self.store(path, array, stamp)
            return None, decode_warning(path, mode, notes)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for path, (error, warning) in zip(todo, pool.map(one, todo)):
                problems.add(path, error, warning)
                if progress:
                    progress(1)
        return len(todo)


def _write_temp(folder: Path, data: memoryview) -> Path:
    """A new temp file in `folder` holding `data`, fsynced. Named by host and a random token,
    created with O_EXCL: never another writer's file, whichever host it runs on. Each write is
    checked: a full disk is an OSError here, not a short file renamed into place."""
    host = socket.gethostname()
    while True:
        tmp = folder / f".{host}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _remove_leftovers(folder: Path, keep: Path | None = None) -> None:
    """Delete an entry folder's older entries (of the image before it changed) and the temp
    files that killed writers left: those older than TEMP_AGE, as a young one may be in flight."""
    for other in folder.iterdir():
        try:
            if other.suffix == ".npy" and keep is not None and other != keep:
                other.unlink()
            elif other.suffix == ".tmp" and time.time() - other.stat().st_mtime > TEMP_AGE:
                other.unlink()
        except FileNotFoundError:  # another writer cleaned it first
            pass


def ram_room(
    meminfo: Path = Path("/proc/meminfo"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    own_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """Bytes the host can give before its available memory falls to RAM_FLOOR of the total
    (0 where /proc/meminfo is missing); in a container (Docker, a Kubernetes pod), no more
    than its memory cgroup can give before its use reaches 1 - RAM_FLOOR of its limit:
    /proc/meminfo shows the host's memory there, and the limit's excess is a kill."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return 0
    kib = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.endswith("kB")}
    room = max(0, kib.get("MemAvailable", 0) - int(RAM_FLOOR * kib.get("MemTotal", 0))) << 10
    for folder, names in _memory_cgroups(cgroup_root, own_cgroup):
        room = min(room, _cgroup_room(folder, *names))
    return room


# (limit, usage, reclaimable page cache in memory.stat) of cgroup v2 and v1.
CGROUP_V2 = ("memory.max", "memory.current", "inactive_file")
CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _memory_cgroups(root: Path, own: Path) -> list[tuple[Path, tuple[str, str, str]]]:
    """This process's memory cgroup folders and their ancestors' (any may set a limit)."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, names = root, CGROUP_V2
        elif "memory" in controllers.split(","):
            base, names = root / "memory", CGROUP_V1
        else:
            continue
        # Where a cgroup namespace hides the path, the mount is the process's own cgroup.
        folder = base / path.strip("/")
        found += [(p, names) for p in (folder, *folder.parents) if p == base or base in p.parents]
    return found


def _cgroup_room(folder: Path, limit_name: str, usage_name: str, cache_name: str) -> int:
    """What a cgroup can give before its use (less reclaimable cache) reaches 1 - RAM_FLOOR of
    its limit; a huge number where it has none (or its files are not there)."""
    try:
        text = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text())
    except (OSError, ValueError):
        return 1 << 62
    if text == "max" or int(text) >= 1 << 60:  # v1 writes "no limit" as a page-rounded 2^63
        return 1 << 62
    limit = int(text)
    try:
        stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text().splitlines())
        usage -= int(stat.get(cache_name, 0))
    except (OSError, ValueError):
        pass
    return max(0, limit - usage - int(RAM_FLOOR * limit))


# --- samples and batches --------------------------------------------------------------------


class LeafImages:
    """Images by `(position, aug_seed)`, as uint8 CHW, written straight into a batch array.

    Positions past the end are padding: a zero image, masked out, so an evaluation batch keeps
    its shape. `aug_seed` None means no augmentation (evaluation, prediction). With a `cache`,
    each image is read from it, or decoded and written to it; `in_ram` also keeps the resized
    images in this process's memory while the host has RAM to spare (see RAM_FLOOR). With
    `skip_bad`, a training image that cannot be decoded becomes a masked zero image too; an
    evaluation image never does (its score or prediction would be invented).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        targets: np.ndarray | None,
        size: int | str,
        transform_factory: Callable | None = None,
        cache: ResizeCache | None = None,
        num_classes: int = 0,
        skip_bad: bool = False,
        in_ram: bool = False,
    ):
        self.paths = list(paths)
        self.skip_bad = skip_bad
        self.targets = targets
        self.size = size
        self.shape = image_shape(size)
        self.num_classes = num_classes if targets is None else targets.shape[1]
        self.transform_factory = transform_factory
        self.cache = cache if cache is not None and cache.shape == self.shape else None
        self.in_ram = in_ram
        self.kept: dict[int, np.ndarray] = {}
        self._credit = 0  # bytes that may still be kept before the next look at meminfo
        self._lock = threading.Lock()
        self._local = threading.local()  # one albumentations Compose per thread: it has RNG state

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, position: int) -> np.ndarray:
        """The resized HWC image: from RAM, from the cache, or decoded (and then cached)."""
        kept = self.kept.get(position)
        if kept is not None:
            return kept
        path, array, stamp = self.paths[position], None, None
        if self.cache is not None:
            try:
                array, stamp = self.cache.read(path)
            except FileNotFoundError:
                pass  # decode names the missing file
        if array is None:
            array = decode(path, self.size)[0]
            if stamp is not None:
                self.cache.store(path, array, stamp)
        if self.in_ram:
            self._keep(position, array)
        return array

    def _keep(self, position: int, array: np.ndarray) -> None:
        with self._lock:
            if self._credit < array.nbytes:
                self._credit = min(ram_room(), RAM_RECHECK)
                if self._credit < array.nbytes:
                    self.in_ram = False  # the host is short of memory: keep no more
                    return
            self._credit -= array.nbytes
            array.setflags(write=False)  # shared by every later epoch: no transform may edit it
            self.kept[position] = array

    def image(self, position: int, aug_seed: int | None) -> np.ndarray:
        """The HWC image at `position`, augmented with the transform seeded by `aug_seed`."""
        image = self.load(position)
        if aug_seed is not None and self.transform_factory is not None:
            transform = getattr(self._local, "transform", None)
            if transform is None:
                transform = self._local.transform = self.transform_factory()
            transform.set_random_seed(aug_seed)
            image = transform(image=image)["image"]
            if image.shape[:2] != self.shape:
                raise UserError(
                    f"augment: the transforms turned a {self.shape[0]}x{self.shape[1]} image "
                    f"into {image.shape[0]}x{image.shape[1]}; every batch has one shape, so "
                    "use transforms that keep the image size"
                )
        return image

    def fill(self, key: tuple[int, int | None], out: np.ndarray) -> bool:
        """Write sample `key` into `out` (3, height, width): one copy, HWC to CHW. False: the
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
        images = np.empty((len(keys), 3, *self.dataset.shape), np.uint8)
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
