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

from leaf_xla.cli import ArgumentParser, SettingError
from leaf_xla.config import add_config_option, identity, parse_args


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
                raise SettingError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("ramp_epochs", "sustain_epochs"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 < self.decay <= 1:
            raise SettingError("decay", f"must be in (0, 1], got {self.decay}")

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
        lr_start=args.lr_start,
        lr_max=args.lr_max * scale,
        lr_min=args.lr_min,
        ramp_epochs=args.ramp_epochs,
        sustain_epochs=args.sustain_epochs,
        decay=args.decay,
    )


def add_schedule_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning rate (the seed's warm-up / sustain / decay)")
    identity(group, "--lr-start", type=float, default=1e-5)
    identity(
        group,
        "--lr",
        "--lr-max",
        dest="lr_max",
        type=float,
        default=5e-5,
        help="peak learning rate for one replica",
    )
    identity(group, "--lr-min", type=float, default=1e-5)
    identity(group, "--ramp-epochs", type=float, default=5)
    identity(group, "--sustain-epochs", type=float, default=0)
    identity(group, "--decay", type=float, default=0.8, help="per-epoch decay factor")
    identity(
        group,
        "--scale-lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="multiply the peak by the number of replicas, as the seed does",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m leaf_xla.schedule",
        description=__doc__.split("\n\n")[0],
    )
    add_config_option(parser)
    parser.add_argument("--epochs", type=int, default=20)
    add_schedule_options(parser)
    parser.add_argument("--replicas", type=int, default=1, help="e.g. 8 for a TPU v3-8")
    parser.add_argument("--plot", type=Path, help="write the curve to this PNG")
    # A training config is read for its schedule keys (and epochs); train checks the others.
    args = parse_args(parser, argv, only_known_keys=True)
    schedule = from_args(args, args.replicas)
    for epoch in range(args.epochs):
        print(f"epoch {epoch:3d}  lr {schedule(epoch):.3e}")
    if args.plot:
        from leaf_xla.report import lr_plot  # matplotlib only when a plot is asked for

        lr_plot(schedule, args.epochs, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
