"""Training-loader throughput: leaf_xla's loader against the loader a typical Kaggle kernel uses.

    python bench/loader.py [--work-dir /tmp/leaf_xla_bench] [--n 64] [--workers 2] [--size 512]

Writes (once) N synthetic 2048x1365 leaf JPEGs at quality 95, about 1 MB each like the
competition's photos, builds the resize cache with prepare's code, then times epochs of
- baseline: torch DataLoader with `--workers` processes over a Dataset doing a full PIL decode,
  albumentations Resize + flips + Normalize, float32 tensors (the common Kaggle kernel);
- jpeg: leaf_xla's LeafImages + BatchLoader + train_batches from the JPEGs, `--workers`
  threads, DCT-scaled decode, flips, uint8 batches;
- cache: the same from the resize cache.
The epochs of the three are interleaved, so that they share whatever else loads the machine.
Prints images/s and CPU time per image (the steadier figure on a busy machine) with medians
and ratios against the baseline of the same run, and for leaf_xla's loader (threads in this
process) the peak RSS of each epoch, which should stay flat.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI version check on import

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from leaf_xla.loader import BatchLoader, LeafImages, ResizeCache, train_batches  # noqa: E402
from leaf_xla.prepare import build_cache  # noqa: E402
from leaf_xla.synth import draw_leaf  # noqa: E402
from leaf_xla.transforms import create_transform  # noqa: E402

WIDTH, HEIGHT, QUALITY = 2048, 1365, 95
NOISE = 4.0  # per-pixel sigma: the fine texture that makes a q95 photo weigh about 1 MB


def make_images(folder: Path, n: int, workers: int) -> list[Path]:
    """The benchmark JPEGs, written once and reused by later runs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"leaf_{i:04d}.jpg" for i in range(n)]

    def write(i: int) -> None:
        if paths[i].is_file():
            return
        rng = np.random.default_rng(i)
        spots = [["rust"], ["scab"], ["rust", "scab"], []][i % 4]
        leaf = np.asarray(draw_leaf(rng, (WIDTH, HEIGHT), spots, {"rust": 0, "scab": 1}))
        noisy = leaf + rng.normal(0, NOISE, leaf.shape)
        tmp = paths[i].with_suffix(".tmp")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=QUALITY)
        tmp.rename(paths[i])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, range(n)))
    return paths


class NaiveDataset(torch.utils.data.Dataset):
    """The typical Kaggle PyTorch kernel's Dataset: full decode, resize, flips, normalise."""

    def __init__(self, paths: list[Path], targets: np.ndarray, size: int):
        self.paths, self.targets = paths, targets
        self.transform = A.Compose(
            [A.Resize(size, size), A.HorizontalFlip(), A.VerticalFlip(), A.Normalize()]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.array(Image.open(self.paths[i]).convert("RGB"))
        image = self.transform(image=image)["image"]
        return torch.from_numpy(image.transpose(2, 0, 1)), torch.from_numpy(self.targets[i])


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) so that each epoch gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU time of this process's threads and of its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_epoch(batches: Iterable, batch_size: int) -> dict[str, float]:
    """One epoch: images/s, CPU milliseconds per image, this process's peak and final RSS."""
    per_epoch = reset_peak_rss()
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    for batch in batches:
        images += batch_size
        del batch
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {
        "rate": images / wall,
        "cpu_ms": 1000 * cpu / images,
        "peak": _status_kb("VmHWM") / 1024 if per_epoch else float("nan"),
        "rss": _status_kb("VmRSS") / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/leaf_xla_bench"))
    parser.add_argument("--n", type=int, default=64, help="images (written once)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    paths = make_images(args.work_dir / f"jpeg_{WIDTH}x{HEIGHT}_q{QUALITY}", args.n, args.workers)
    mean_mb = np.mean([p.stat().st_size for p in paths]) / 1e6
    print(
        f"{args.n} JPEGs {WIDTH}x{HEIGHT} q{QUALITY}, mean {mean_mb:.2f} MB; {args.size}px, "
        f"batch {args.batch_size}, {args.workers} worker(s), {os.cpu_count()} CPU(s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rng = np.random.default_rng(0)
    targets = np.eye(4, dtype=np.float32)[rng.integers(0, 4, args.n)]
    torch.set_num_threads(1)  # the loaders' own workers do the work, as in training

    cache_root = args.work_dir / "cache"
    shutil.rmtree(cache_root, ignore_errors=True)
    start = time.perf_counter()
    build_cache(ResizeCache(cache_root, args.size), paths, args.workers)
    built = args.n / (time.perf_counter() - start)
    disk_mb = sum(f.stat().st_size for f in cache_root.rglob("*.npy")) / 1e6
    print(f"resize cache (prepare's code): built at {built:.1f} img/s, {disk_mb:.0f} MB on disk")

    naive = NaiveDataset(paths, targets, args.size)
    direct = LeafImages(paths, targets, args.size, create_transform)
    cached = LeafImages(
        paths, targets, args.size, create_transform, ResizeCache(cache_root, args.size)
    )

    def baseline(epoch: int) -> Iterable:
        torch.manual_seed(epoch)
        return torch.utils.data.DataLoader(
            naive, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
        )

    def ours(images: LeafImages) -> Callable[[int], Iterable]:
        def epoch_batches(epoch: int) -> Iterable:
            batches = train_batches(args.n, args.batch_size, 1, 0, 0, epoch)
            return BatchLoader(images, batches, args.workers)

        return epoch_batches

    loaders = {
        "baseline": baseline,  # DataLoader processes, full decode, albumentations, float32
        "jpeg": ours(direct),  # leaf_xla threads, DCT-scaled decode, flips, uint8
        "cache": ours(cached),  # leaf_xla from the resize cache
    }
    # Epochs interleaved, so that the three share whatever else loads the machine.
    print(
        f"RSS before the first epoch {_status_kb('VmRSS') / 1024:.0f} MiB (mostly torch's import)"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
    for epoch in range(args.epochs):
        for name, epoch_batches in loaders.items():
            row = run_epoch(epoch_batches(epoch), args.batch_size)
            results[name].append(row)
            memory = (
                ""
                if name == "baseline"
                else (f"  peak RSS {row['peak']:4.0f} MiB, after {row['rss']:4.0f} MiB")
            )
            print(
                f"epoch {epoch} {name:<8} {row['rate']:7.1f} img/s  "
                f"{row['cpu_ms']:5.1f} CPU ms/img{memory}"
            )

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base_rate, base_cpu = median("baseline", "rate"), median("baseline", "cpu_ms")
    print(f"\nmedians over {args.epochs} epochs ({args.workers} workers each):")
    print(f"  {'':<20}{'img/s':>8}{'vs base':>9}{'CPU ms/img':>12}{'vs base':>9}")
    labels = {
        "baseline": "baseline",
        "jpeg": "leaf_xla, JPEGs",
        "cache": "leaf_xla, cache",
    }
    for name, label in labels.items():
        rate, cpu = median(name, "rate"), median(name, "cpu_ms")
        print(f"  {label:<20}{rate:8.1f}{rate / base_rate:8.2f}x{cpu:12.1f}{base_cpu / cpu:8.2f}x")
    print("  targets: JPEGs >= 1.6x, cache >= 8x the baseline's images/s")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
