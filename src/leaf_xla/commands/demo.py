"""The whole job on generated data, on the CPU, in a few minutes, downloading nothing.

    leaf-xla demo --out-dir demo

Writes a synthetic Plant Pathology 2020 set (demo/data), trains two tiny timm models on the XLA
CPU device (plain CPU if torch_xla is missing), predicts the test split with flip TTA, averages
them and writes demo/submission.csv with a summary of validation AUCs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands import recipe, train
from leaf_xla.commands.parser import ArgumentParser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("demo"))
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--config", default="demo_ensemble", help="ensemble YAML to run")
    parser.add_argument(
        "--device",
        choices=("xla", "cpu", "cuda"),
        help="default: xla (on the CPU) when torch_xla is installed, else cpu",
    )
    return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The demo's options, and the others, which go to train (typos fail here)."""
    args, extra = build_parser().parse_known_args(argv)
    train.build_parser().parse_args(extra)
    return args, extra


def main(argv: Sequence[str] | None = None) -> None:
    args, extra = parse(argv)
    data_dir = args.out_dir / "data"
    if not (data_dir / "train.csv").is_file():
        from leaf_xla.synth import write_dataset

        write_dataset(data_dir, args.n_train, args.n_test, seed=0, size=(256, 171))
        print(f"wrote a synthetic data set to {data_dir}")
    # The XLA CPU device when torch_xla is installed: the same code path as on a TPU, asked
    # for by name (--device auto means plain CPU on a machine without an accelerator).
    device = args.device
    try:
        import torch_xla  # noqa: F401

        os.environ.setdefault("PJRT_DEVICE", "CPU")
        device = device or "xla"
    except ImportError:
        device = device or "cpu"
    recipe_argv = [
        *("--config", args.config, "--data-dir", str(data_dir)),
        *("--out-dir", str(args.out_dir), "--device", device, "--resume"),
    ]
    recipe.main(recipe_argv + (["--", *extra] if extra else []))
