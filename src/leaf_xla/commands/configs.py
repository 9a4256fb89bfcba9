"""List the configs shipped with leaf_xla: pass a name to --config."""

from __future__ import annotations

from collections.abc import Sequence

from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.config import shipped_configs, summary


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="leaf-xla configs", description=__doc__)
    parser.add_argument("--paths", action="store_true", help="print each config's file path")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    shipped = shipped_configs()
    width = max(map(len, shipped), default=0)
    for name, path in shipped.items():
        print(f"{name:<{width}}  {path if args.paths else summary(path)}")
