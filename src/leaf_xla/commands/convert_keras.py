"""Convert Keras ResNet*V2 weights (h5, no TensorFlow needed) to safetensors for the timm models
keras_resnet{50,101,152}v2.

    leaf-xla convert_keras resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5 \\
        --out weights/resnet152v2_imagenet.safetensors
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands.parser import ArgumentParser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla convert_keras", description=__doc__.split("\n\n")[0])
    parser.add_argument("h5", type=Path, help="Keras .h5 / .weights.h5 / .keras file")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument(
        "--arch",
        help="resnet50v2, resnet101v2 or resnet152v2 (default: detected from the layer names)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from leaf_xla.convert_keras import convert_file  # torch, h5py: after the arguments

    print(convert_file(args.h5, args.out, args.arch))
