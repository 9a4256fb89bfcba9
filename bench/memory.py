"""Rough training memory per TPU core for the seed configs, estimated on the CPU.

Activations kept for the backward pass are approximated by the outputs of every leaf module
in one forward pass at batch 1 (an upper bound: XLA fuses and rematerialises some of them),
scaled to the config's per-core batch; bf16 halves them. Weights, gradients and Adam's two
moments are 16 bytes a parameter in fp32.

    python bench/memory.py [--configs tf_efficientnet_b7 ... seresnext50_32x4d]
"""

from __future__ import annotations

import argparse

import torch

from leaf_xla.commands.options import parse_args
from leaf_xla.commands.train import build_parser as train_parser
from leaf_xla.models import ModelSpec, create_model
from leaf_xla.settings import image_shape

SEED_CONFIGS = [
    "tf_efficientnet_b7",
    "tf_efficientnet_b6",
    "keras_resnet152v2",
    "inception_resnet_v2",
]


def activation_elements(model: torch.nn.Module, size: int | str) -> int:
    """Elements output by the leaf modules for one image of `size` (512 or "480x768")."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, 3, *image_shape(size)))
    for hook in hooks:
        hook.remove()
    return total


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/ tests parse the lines they show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=SEED_CONFIGS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    print(
        "| config | params | px | batch/core | precision | activations | weights+grads+Adam "
        "| total (rough) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        cfg = parse_args(train_parser(), ["--config", name])
        model = create_model(ModelSpec(cfg.model, 4, pretrained=False)).eval()
        params = sum(p.numel() for p in model.parameters())
        per_image = activation_elements(model, cfg.image_size)
        bytes_per = 2 if cfg.precision == "bf16" else 4
        activations = per_image * cfg.batch_size * bytes_per / 2**30
        states = params * 16 / 2**30
        print(
            f"| {name} | {params / 1e6:.1f}M | {cfg.image_size} | {cfg.batch_size} | "
            f"{cfg.precision} | {activations:.1f} GiB | {states:.1f} GiB | "
            f"{activations + states:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
