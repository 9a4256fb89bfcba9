"""Predict class probabilities from one or more checkpoints (e.g. every fold of a model).

    leaf-xla predict --checkpoint runs/tf_efficientnet_b7-fold*/best.pt \\
        --data-dir data/plant-pathology-2020-fgvc7 --tta none hflip vflip --out b7_test.csv

The test split comes out in sample_submission.csv's order; `--split train` instead re-predicts
each checkpoint's own validation fold (out-of-fold predictions). Checkpoints are averaged;
`--tta` averages flipped views on the device inside the compiled step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands.options import add_launch_options, launch_settings
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.settings import PRECISIONS, check_data_dir
from leaf_xla.tta import TTA_FLIPS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="leaf-xla predict",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help="best.pt / last.pt files; their probabilities are averaged",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="competition folder")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="train: each checkpoint's validation fold (OOF)",
    )
    parser.add_argument(
        "--tta",
        nargs="+",
        choices=list(TTA_FLIPS),
        default=["none"],
        help="flipped views to average",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="per replica")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument(
        "--cache",
        choices=("auto", "off"),
        default="auto",
        help="resize cache: read it, and fill it with the images decoded / never",
    )
    parser.add_argument("--cache-dir", type=Path, help="resize cache (default: the data's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    add_launch_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_data_dir(args.data_dir)
    from leaf_xla.predict import PredictSettings, predict  # torch: after the arguments

    names = {f.name for f in dataclasses.fields(PredictSettings)} - {"launch"}
    values = {k: v for k, v in vars(args).items() if k in names}
    predict(PredictSettings(**values, launch=launch_settings(args)))
