"""Decode + resize of one photo: leaf_xla's against the two it replaced, paired CPU time.

    python bench/decode.py --data /tmp/leafbench [--sizes 512 800] [--n 100] [--repeats 3]

Throughput on a shared 2-core machine swings by 15% between runs, more than the difference
between two decoders, so this measures CPU time instead: one thread, each image decoded by
every variant in turn (the same image, the same moment), `time.thread_time` around each call.
- `opencv`: `cv2.imdecode` at the same DCT scale (BGR), `F.interpolate` (antialiased bilinear)
  read back as a strided HWC view, `cv2.cvtColor` to RGB (the loader until December 2026);
- `simplejpeg`: simplejpeg straight to RGB, `F.interpolate`, `.contiguous()` back to HWC;
- `leaf_xla`: `data._decode_turbo` (simplejpeg, the same filter written straight into an
  HWC array by the resize's out= form, `data.resize_bilinear`).
Prints ms of CPU per image, the speed-up over `opencv`, and each one's mean absolute difference
(of 255) from a full PIL decode + PIL `BILINEAR` resize.
"""

from __future__ import annotations

import argparse
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

OPENCV_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def opencv(raw: bytes, width: int, height: int, shape: tuple[int, int]) -> np.ndarray:
    flags = OPENCV_FLAGS[data._dct_scale(width, height, shape)] | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), flags)
    chw = torch.from_numpy(bgr).permute(2, 0, 1).unsqueeze(0)
    chw = F.interpolate(chw, size=shape, mode="bilinear", antialias=True)
    return cv2.cvtColor(chw[0].permute(1, 2, 0).numpy(), cv2.COLOR_BGR2RGB)


def simplejpeg_interpolate(
    raw: bytes, width: int, height: int, shape: tuple[int, int]
) -> np.ndarray:
    scale = data._dct_scale(width, height, shape)
    rgb = simplejpeg.decode_jpeg(
        raw, "rgb", min_height=-(-height // scale), min_width=-(-width // scale)
    )
    chw = F.interpolate(data._as_nchw(rgb), size=shape, mode="bilinear", antialias=True)
    return chw[0].permute(1, 2, 0).contiguous().numpy()


VARIANTS: dict[str, Callable[..., np.ndarray]] = {
    "opencv": opencv,
    "simplejpeg": simplejpeg_interpolate,
    "leaf_xla": data._decode_turbo,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/*.jpg")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--n", type=int, default=100, help="images")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = sorted((args.data / "images").glob("*.jpg"))[: args.n]
    raws = [p.read_bytes() for p in paths]
    with Image.open(paths[0]) as image:
        width, height = image.size
    print(f"{len(paths)} JPEGs of {width}x{height}, {args.repeats} repeats, one thread")
    for size in args.sizes:
        shape = (size, size)
        cpu = dict.fromkeys(VARIANTS, 0.0)
        for _ in range(args.repeats):
            for raw in raws:
                for name, fn in VARIANTS.items():
                    begun = time.thread_time()
                    fn(raw, width, height, shape)
                    cpu[name] += time.thread_time() - begun
        with Image.open(paths[0]) as image:
            full = np.asarray(image.convert("RGB").resize(shape[::-1], Image.BILINEAR), float)
        for name, fn in VARIANTS.items():
            ms = cpu[name] / (len(raws) * args.repeats) * 1000
            mad = np.abs(fn(raws[0], width, height, shape) - full).mean()
            print(
                f"{size}px {name:<10} {ms:6.2f} ms CPU/image  {cpu['opencv'] / cpu[name]:5.2f}x"
                f"  MAD {mad:.3f}"
            )


if __name__ == "__main__":
    main()
