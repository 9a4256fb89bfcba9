"""Print (or plot) the learning rate of each epoch: the seed's warm-up, sustain and decay.

leaf-xla schedule --config tf_efficientnet_b7 --replicas 8 --plot lr.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands.options import (
    add_config_option,
    add_schedule_options,
    parse_args,
    settings_of,
)
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.settings import ScheduleSettings


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla schedule", description=__doc__.split("\n\n")[0])
    add_config_option(parser)
    parser.add_argument("--epochs", type=int, default=20)
    add_schedule_options(parser)
    parser.add_argument("--replicas", type=int, default=1, help="e.g. 8 for a TPU v3-8")
    parser.add_argument("--plot", type=Path, help="write the curve to this PNG")
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    # A training config is read for its schedule keys (and epochs); train checks the others.
    return parse_args(build_parser(), argv, only_known_keys=True)


def main(argv: Sequence[str] | None = None) -> None:
    from leaf_xla.schedule import Schedule

    args = parse(argv)
    schedule = Schedule.of(settings_of(ScheduleSettings, args), args.replicas)
    for epoch in range(args.epochs):
        print(f"epoch {epoch:3d}  lr {schedule(epoch):.3e}")
    if args.plot:
        from leaf_xla.report import lr_plot  # matplotlib only when a plot is asked for

        lr_plot(schedule, args.epochs, args.plot)
        print(f"wrote {args.plot}")
