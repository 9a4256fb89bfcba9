"""The seed's learning rate: linear warm-up, sustain, then exponential decay.

A pure function of the fractional epoch, evaluated at every optimizer update:

    epoch < ramp:              lr_start + (lr_max - lr_start) * epoch / ramp
    epoch < ramp + sustain:    lr_max
    after:                     (lr_max - lr_min) * decay ** (epoch - ramp - sustain) + lr_min

As in the seed, lr_max is multiplied by the number of replicas (`scale_lr`), since the global
batch grows with them.

    python -m leaf_xla.schedule --config tf_efficientnet_b7 --replicas 8 --plot lr.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leaf_xla.cli import UserError
from leaf_xla.config import parse_args


@dataclass(frozen=True)
class Schedule:
    lr_start: float = 1e-5
    lr_max: float = 5e-5
    lr_min: float = 1e-5
    ramp_epochs: float = 5
    sustain_epochs: float = 0
    decay: float = 0.8

    def __post_init__(self) -> None:
        for name in ("lr_start", "lr_max", "lr_min"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.ramp_epochs < 0 or self.sustain_epochs < 0:
            raise UserError("--ramp-epochs and --sustain-epochs must be >= 0")
        if not 0 < self.decay <= 1:
            raise UserError(f"--decay must be in (0, 1], got {self.decay}")

    def __call__(self, epoch: float) -> float:
        if epoch < self.ramp_epochs:
            return self.lr_start + (self.lr_max - self.lr_start) * epoch / self.ramp_epochs
        if epoch < self.ramp_epochs + self.sustain_epochs:
            return self.lr_max
        after = epoch - self.ramp_epochs - self.sustain_epochs
        return (self.lr_max - self.lr_min) * self.decay**after + self.lr_min


def from_args(args: argparse.Namespace, replicas: int = 1) -> Schedule:
    scale = replicas if args.scale_lr else 1
    return Schedule(
        args.lr_start,
        args.lr_max * scale,
        args.lr_min,
        args.ramp_epochs,
        args.sustain_epochs,
        args.decay,
    )


def add_schedule_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning rate (the seed's warm-up / sustain / decay)")
    group.add_argument("--lr-start", type=float, default=1e-5)
    group.add_argument(
        "--lr",
        "--lr-max",
        dest="lr_max",
        type=float,
        default=5e-5,
        help="peak learning rate for one replica",
    )
    group.add_argument("--lr-min", type=float, default=1e-5)
    group.add_argument("--ramp-epochs", type=float, default=5)
    group.add_argument("--sustain-epochs", type=float, default=0)
    group.add_argument("--decay", type=float, default=0.8, help="per-epoch decay factor")
    group.add_argument(
        "--scale-lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="multiply the peak by the number of replicas, as the seed does",
    )


def plot(schedule: Schedule, epochs: int, path: Path, steps_per_epoch: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leaf_xla.files import atomic_path

    xs = [i / steps_per_epoch for i in range(epochs * steps_per_epoch + 1)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [schedule(x) for x in xs])
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("warm-up, sustain, exponential decay")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    from leaf_xla.train import build_parser  # a training config is plotted as it is

    parser = build_parser(prog="python -m leaf_xla.schedule", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=1, help="e.g. 8 for a TPU v3-8")
    parser.add_argument("--plot", type=Path, help="write the curve to this PNG")
    args = parse_args(parser, argv)
    schedule = from_args(args, args.replicas)
    for epoch in range(args.epochs):
        print(f"epoch {epoch:3d}  lr {schedule(epoch):.3e}")
    if args.plot:
        plot(schedule, args.epochs, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
