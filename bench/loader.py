"""Host input pipeline: leaf_xla's loader against the seed kernel's tf.data, on the same JPEGs.

    python bench/loader.py --data /tmp/leafbench [--sizes 512 800] [--rounds 2] [--workers 2]

`--data`: a folder with `images/*.jpg` (e.g. written by make_jpegs.py, 2048x1365 at quality 95);
without it, N synthetic 2048x1365 q95 leaves are written once under `--work-dir`. Every figure
comes from a fresh process (its own imports, its own peak memory), the pipelines taking turns
within each round so that they share whatever else loads the machine:
- `seed`: the seed's tf.data (read_file, decode_jpeg, /255 to float, resize, random flips,
  batch, prefetch, AUTOTUNE; `.repeat()` with one iterator, as its model.fit); needs TensorFlow
  (the `keras` extra);
- `leaf`: LeafImages + BatchLoader + train_batches, `--workers` threads, flips, uint8 batches,
  decoding every pass (`--cache off`);
- one warm-up pass, then `--passes` timed passes, for each size;
- 20 epochs at the first size, total input time: `seed` decoding every epoch, `seed+cache`
  with `.cache()` after decode + resize (the float images kept in RAM), and `leaf` with
  `--cache auto` starting from an empty cache (epoch 1 decodes and fills it, the rest read RAM).
Prints each run's passes, then per row the figure of every round, their median, the ratio to
the seed's median of the same run, the ratio to the seed in each round, and each process's
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, QUALITY = 2048, 1365, 95
NOISE = 4.0  # per-pixel sigma: the fine texture that makes a q95 photo weigh about 1 MB


def make_images(folder: Path, n: int, workers: int) -> list[Path]:
    """The benchmark JPEGs, written once and reused by later runs."""
    from PIL import Image

    from leaf_xla.synth import draw_leaf

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


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- one measurement, in its own process -----------------------------------------------------


def seed_pipeline(paths: list[str], size: int, batch: int, cache: bool) -> Iterable:
    """The seed kernel's tf.data input, as written there (plus `.cache()` when asked)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    auto = tf.data.experimental.AUTOTUNE

    def decode_image(filename, label):
        image = tf.image.decode_jpeg(tf.io.read_file(filename), channels=3)
        image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (size, size))
        return image, label

    def data_augment(image, label):
        image = tf.image.random_flip_left_right(image)
        return tf.image.random_flip_up_down(image), label

    labels = tf.one_hot(np.arange(len(paths)) % 4, 4)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(decode_image, auto)
    if cache:
        ds = ds.cache()
    ds = ds.map(data_augment, auto).repeat().batch(batch).prefetch(auto)
    return iter(ds)


def measure(args: argparse.Namespace, paths: list[Path]) -> dict:
    """Time `args.worker` on `paths`: images/s of each timed pass, or the total of all epochs."""
    import itertools

    steps = -(-len(paths) // args.batch_size)
    if args.worker.startswith("seed"):
        batches = seed_pipeline([str(p) for p in paths], args.size, args.batch_size, args.cached)

        def one_pass(_: int) -> int:
            return sum(int(b[0].shape[0]) for b in itertools.islice(batches, steps))

    else:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from leaf_xla.loader import BatchLoader, LeafImages, ResizeCache, train_batches
        from leaf_xla.transforms import create_transform

        cache = ResizeCache(args.cache_dir, args.size) if args.cache_dir else None
        targets = np.eye(4, dtype=np.float32)[np.arange(len(paths)) % 4]
        images = LeafImages(
            paths, targets, args.size, create_transform, cache, in_ram=cache is not None
        )

        def one_pass(epoch: int) -> int:
            batches = train_batches(len(paths), args.batch_size, 1, 0, 0, epoch)
            return sum(len(b["image"]) for b in BatchLoader(images, batches, args.workers))

    rates, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        begun = time.perf_counter()
        count = one_pass(epoch)
        rates.append(count / (time.perf_counter() - begun))
    total = time.perf_counter() - start
    return {"rates": rates, "total_s": total, "peak_mib": peak_rss_mib()}


# --- the rounds ------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace, kind: str, size: int, epochs: int, **extra) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--size",
        str(size),
        "--epochs",
        str(epochs),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--paths-file",
        str(args.paths_file),
    ]
    if extra.get("cached"):
        command.append("--cached")
    if extra.get("cache_dir"):
        command += ["--cache-dir", str(extra["cache_dir"])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {size}px failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def speedup(ours: float, seed: float, rate: bool) -> float:
    """How many times faster: of images/s when `rate`, else of seconds."""
    return ours / seed if rate else seed / ours


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/ tests parse the lines they show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="folder with images/*.jpg")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/leaf_xla_bench"))
    parser.add_argument("--n", type=int, default=200, help="images (written once without --data)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passes", type=int, default=3, help="timed passes after a warm-up")
    parser.add_argument("--long-epochs", type=int, default=20, help="epochs of the total rows")
    parser.add_argument("--rounds", type=int, default=2)
    # one measurement (run by the rounds, in a process of its own)
    parser.add_argument("--worker", choices=("seed", "leaf"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    if args.worker:
        paths = [Path(p) for p in args.paths_file.read_text().split("\n") if p]
        print(json.dumps(measure(args, paths)))
        return

    if args.data:
        paths = sorted((args.data / "images").glob("*.jpg"))[: args.n]
    else:
        paths = make_images(args.work_dir / f"jpeg_{WIDTH}x{HEIGHT}_q{QUALITY}", args.n, 2)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.paths_file = args.work_dir / "paths.txt"
    args.paths_file.write_text("\n".join(map(str, paths)))
    mean_mb = np.mean([p.stat().st_size for p in paths]) / 1e6
    print(
        f"{len(paths)} JPEGs, mean {mean_mb:.2f} MB; batch {args.batch_size}, "
        f"{args.workers} thread(s), {os.cpu_count()} CPU(s); 1 warm-up + {args.passes} timed "
        f"passes; {args.rounds} round(s); load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    long_size = args.sizes[0]
    rows: dict[str, list[dict]] = {}  # name: one result per round
    base_of: dict[str, str] = {}  # name: the seed row it is compared with
    for round_ in range(args.rounds):
        for size in args.sizes:
            for kind in ("seed", "leaf"):
                name = f"{kind} {size}px img/s"
                got = run_worker(args, kind, size, 1 + args.passes)
                got["figure"] = statistics.mean(got["rates"][1:])  # the warm-up left out
                rows.setdefault(name, []).append(got)
                base_of[name] = f"seed {size}px img/s"
                passes = " ".join(f"{r:.1f}" for r in got["rates"][1:])
                print(f"round {round_} {kind:<4} {size}px: {got['figure']:6.1f} img/s ({passes})")
        cache_dir = args.work_dir / "cache"
        for label, kind, extra in (
            ("seed", "seed", {}),
            ("seed+cache", "seed", {"cached": True}),
            ("leaf auto", "leaf", {"cache_dir": cache_dir}),
        ):
            name = f"{args.long_epochs} epochs {label} s"
            shutil.rmtree(cache_dir, ignore_errors=True)  # every long leaf run starts empty
            got = run_worker(args, kind, long_size, args.long_epochs, **extra)
            got["figure"] = got["total_s"]
            rows.setdefault(name, []).append(got)
            base_of[name] = f"{args.long_epochs} epochs seed s"
            print(
                f"round {round_} {args.long_epochs} epochs {label} {long_size}px: "
                f"{got['total_s']:.1f} s (epoch 1 {len(paths) / got['rates'][0]:.1f} s, "
                f"then {len(paths) / statistics.median(got['rates'][1:]):.2f} s/epoch), "
                f"peak RSS {got['peak_mib']:.0f} MiB",
                flush=True,
            )
        shutil.rmtree(cache_dir, ignore_errors=True)

    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    wide = 7 * args.rounds + 2  # room for one "123.45/" or "1234/" per round
    print(
        f"{'':<28}{'rounds':>{wide}}{'median':>9}{'vs seed':>9}{'per round':>{wide}}"
        f"{'peak RSS MiB':>{wide}}"
    )
    for name, results in rows.items():
        figures = [r["figure"] for r in results]
        seeds = [r["figure"] for r in rows[base_of[name]]]
        median, seed = statistics.median(figures), statistics.median(seeds)
        rate = name.endswith("img/s")  # higher is better; seconds: lower is better
        digits = 1 if rate else 2
        shown = "/".join(f"{f:.{digits}f}" for f in figures)
        rounds = "/".join(f"{speedup(f, s, rate):.2f}" for f, s in zip(figures, seeds))
        peak = "/".join(f"{r['peak_mib']:.0f}" for r in results)
        print(
            f"{name:<28}{shown:>{wide}}{median:9.{digits}f}{speedup(median, seed, rate):8.2f}x"
            f"{rounds:>{wide}}{peak:>{wide}}"
        )


if __name__ == "__main__":
    main()
