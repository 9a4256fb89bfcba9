"""Decode + resize of one photo: leaf_xla's, the two it replaced, the options not taken.

    python bench/decode.py --data /tmp/leafbench [--sizes 512 800] [--n 100] [--repeats 3]

Throughput on a shared 2-core machine swings by 15% between runs, more than the difference
between two decoders, so this measures CPU time instead: one thread, each photo decoded by
every variant in turn (the same photo, the same moment, the order rotating from photo to
photo), `time.thread_time` around each call. Variants, each from the JPEG's bytes to an HWC
uint8 image of the size:
- `opencv`: `cv2.imdecode` at the same DCT scale (BGR), `F.interpolate` (antialiased
  bilinear) read back as a strided HWC view, `cv2.cvtColor` to RGB (the loader until December
  2026);
- `simplejpeg`: simplejpeg straight to RGB, `F.interpolate`, `.contiguous()` back to HWC;
- `leaf_xla`: `data._decode_turbo` (simplejpeg, the same filter written straight into an HWC
  array by the out= form of the op, `data.resize_bilinear`);
- `fastdct`, `fastupsample`: leaf_xla with libjpeg-turbo's fast integer IDCT (the default of
  the seed's `tf.io.decode_jpeg`) or its fast chroma upsampling;
- `m/8 scale`: simplejpeg at the smallest M/8 scale still at least the size (5/8 for a
  2048x1365 photo at 800 px, 3/8 at 512 px), then the same resize.
Prints ms of CPU per photo, the speed-up over `opencv` and the mean absolute difference (MAD,
of 255) from a full PIL decode + PIL `BILINEAR` resize, over the first `--mad-photos` photos.
Then leaf_xla's stages, timed the same way: the decode (and OpenCV's, with the minor page
faults of each), the resize (either form), the copy into a CHW batch slot, the flips.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from leaf_xla import data
from leaf_xla.transforms import create_transform

Shape = tuple[int, int]
OPENCV_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def _minimum(width: int, height: int, shape: Shape) -> dict[str, int]:
    """simplejpeg's arguments for leaf_xla's DCT scale (1, 1/2, 1/4, 1/8)."""
    scale = data._dct_scale(width, height, shape)
    return {"min_height": -(-height // scale), "min_width": -(-width // scale)}


def opencv_decode(raw: bytes, width: int, height: int, shape: Shape) -> np.ndarray:
    flags = OPENCV_FLAGS[data._dct_scale(width, height, shape)] | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.imdecode(np.frombuffer(raw, np.uint8), flags)


def interpolate_hwc(rgb: np.ndarray, shape: Shape) -> torch.Tensor:
    """F.interpolate's result as an HWC view of its NCHW memory."""
    chw = F.interpolate(data._as_nchw(rgb), size=shape, mode="bilinear", antialias=True)
    return chw[0].permute(1, 2, 0)


def opencv(raw: bytes, width: int, height: int, shape: Shape) -> np.ndarray:
    bgr = interpolate_hwc(opencv_decode(raw, width, height, shape), shape)
    return cv2.cvtColor(bgr.numpy(), cv2.COLOR_BGR2RGB)


def simplejpeg_decode(raw: bytes, width: int, height: int, shape: Shape) -> np.ndarray:
    return simplejpeg.decode_jpeg(raw, "rgb", **_minimum(width, height, shape))


def simplejpeg_interpolate(raw: bytes, width: int, height: int, shape: Shape) -> np.ndarray:
    rgb = simplejpeg_decode(raw, width, height, shape)
    return interpolate_hwc(rgb, shape).contiguous().numpy()


def with_options(**options: bool) -> Callable[..., np.ndarray]:
    def variant(raw: bytes, width: int, height: int, shape: Shape) -> np.ndarray:
        rgb = simplejpeg.decode_jpeg(raw, "rgb", **options, **_minimum(width, height, shape))
        return data.resize_bilinear(rgb, shape)

    return variant


def m8_scale(raw: bytes, width: int, height: int, shape: Shape) -> np.ndarray:
    rgb = simplejpeg.decode_jpeg(raw, "rgb", min_height=shape[0], min_width=shape[1])
    return data.resize_bilinear(rgb, shape)


VARIANTS: dict[str, Callable[..., np.ndarray]] = {
    "opencv": opencv,
    "simplejpeg": simplejpeg_interpolate,
    "leaf_xla": data._decode_turbo,
    "fastdct": with_options(fastdct=True),
    "fastupsample": with_options(fastupsample=True),
    "m/8 scale": m8_scale,
}


def timed(fn: Callable, *args) -> tuple[float, int, object]:
    """(CPU seconds of this thread, its minor page faults, the result)."""
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    begun = time.thread_time()
    result = fn(*args)
    spent = time.thread_time() - begun
    return spent, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults, result


def reference(path: Path, shape: Shape) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize(shape[::-1], Image.BILINEAR), float)


def compare_variants(paths: list[Path], raws: list[bytes], shape: Shape, args) -> None:
    names = list(VARIANTS)
    cpu = dict.fromkeys(names, 0.0)
    for _ in range(args.repeats):
        for i, raw in enumerate(raws):
            height, width = simplejpeg.decode_jpeg_header(raw)[:2]
            for name in names[i % len(names) :] + names[: i % len(names)]:
                cpu[name] += timed(VARIANTS[name], raw, width, height, shape)[0]
    mad = dict.fromkeys(names, 0.0)
    for path, raw in zip(paths[: args.mad_photos], raws):
        height, width = simplejpeg.decode_jpeg_header(raw)[:2]
        full = reference(path, shape)
        for name, fn in VARIANTS.items():
            mad[name] += np.abs(fn(raw, width, height, shape) - full).mean() / args.mad_photos
    for name in names:
        ms = cpu[name] / (len(raws) * args.repeats) * 1000
        print(
            f"{shape[0]}px {name:<13} {ms:6.2f} ms CPU/photo  {cpu['opencv'] / cpu[name]:5.2f}x"
            f"  MAD {mad[name]:.3f}"
        )


def time_stages(raws: list[bytes], shape: Shape, args) -> None:
    flips = create_transform(0.5, 0.5)
    slot = np.empty((3, *shape), np.uint8)
    stages = ("opencv decode", "decode", "F.interpolate + HWC copy", "resize", "CHW copy", "flips")
    cpu, faults = dict.fromkeys(stages, 0.0), dict.fromkeys(stages, 0)
    for _ in range(args.repeats):
        for i, raw in enumerate(raws):
            height, width = simplejpeg.decode_jpeg_header(raw)[:2]
            spent = {
                "opencv decode": timed(opencv_decode, raw, width, height, shape),
                "decode": timed(simplejpeg_decode, raw, width, height, shape),
            }
            rgb = spent["decode"][2]
            spent["F.interpolate + HWC copy"] = timed(
                lambda rgb: interpolate_hwc(rgb, shape).contiguous(), rgb
            )
            spent["resize"] = timed(data.resize_bilinear, rgb, shape)
            small = spent["resize"][2]
            spent["CHW copy"] = timed(np.copyto, slot, small.transpose(2, 0, 1))
            flips.set_random_seed(i)
            spent["flips"] = timed(lambda small: flips(image=small)["image"], small)
            for stage, (seconds, count, _) in spent.items():
                cpu[stage] += seconds
                faults[stage] += count
    runs = len(raws) * args.repeats
    for stage in stages:
        print(
            f"{shape[0]}px stage {stage:<25} {cpu[stage] / runs * 1000:6.2f} ms CPU/photo"
            f"  {faults[stage] / runs:6.0f} page faults"
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/ tests parse the lines they show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/*.jpg")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--n", type=int, default=100, help="photos")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mad-photos", type=int, default=10, help="photos the MAD averages")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted((args.data / "images").glob("*.jpg"))[: args.n]
    raws = [p.read_bytes() for p in paths]
    args.mad_photos = min(args.mad_photos, len(paths))
    print(f"{len(paths)} JPEGs, {args.repeats} repeats, one thread, MAD over {args.mad_photos}")
    for size in args.sizes:
        compare_variants(paths, raws, (size, size), args)
        time_stages(raws, (size, size), args)


if __name__ == "__main__":
    main()
