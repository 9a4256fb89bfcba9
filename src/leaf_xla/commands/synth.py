"""Write a synthetic data set in a Kaggle leaf-competition layout (no network, deterministic).

Harder data for benchmarks: `--signal` below 1 blends the spots into the leaf (their opacity),
`--label-noise` replaces that fraction of train.csv's labels by another class (the images keep
their true class's spots), and `--test-labels FILE` writes the test images' true labels to a
file outside the data folder, where no training command looks.

    leaf-xla synth --out data/demo --n-train 240 --n-test 60
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.synth import FORMATS


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 320x213, got {text!r}"
        ) from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"image size must be at least 16x16, got {text!r}")
    return width, height


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--n-train", type=int, default=240, help="training images")
    parser.add_argument("--n-test", type=int, default=60, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=parse_size, default=(320, 213), help="WxH, e.g. 2048x1365")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="pp2020",
        help="pp2020 one-hot columns, pp2021 space-separated labels, cassava integer labels, "
        "generic image_id,label with class names",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument(
        "--signal", type=float, default=1.0, help="opacity of the disease spots, in (0, 1]"
    )
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="fraction of train.csv's labels replaced by another class (test labels stay clean)",
    )
    parser.add_argument(
        "--test-labels",
        type=Path,
        help="CSV to write the test images' true labels to (outside --out)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from leaf_xla.synth import write_dataset

    out = write_dataset(
        args.out,
        args.n_train,
        args.n_test,
        seed=args.seed,
        size=args.size,
        fmt=args.format,
        quality=args.quality,
        signal=args.signal,
        label_noise=args.label_noise,
        test_labels=args.test_labels,
    )
    print(f"wrote {args.n_train} train and {args.n_test} test images ({args.format}) to {out}")
