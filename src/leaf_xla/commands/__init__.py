"""The commands: one thin module each, which parses its options, calls the library and prints.

Each has `build_parser()` and `main(argv)`, and `parse(argv)` where parsing is more than
`build_parser().parse_args(argv)` (a --config file, a `--` pass-through, demo's options for
train). `leaf-xla NAME ...`
and `python -m leaf_xla NAME ...` run it (leaf_xla.cli). A command module imports only light
modules at its top and the library after parsing, so that --help and a mistyped option are
answered before torch, timm and torch_xla are loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

from leaf_xla.errors import UserError

COMMANDS = {
    "synth": "write a synthetic data set in a Kaggle leaf-competition layout",
    "check": "validate a data directory and print a report",
    "prepare": "write the pre-resized image cache",
    "train": "train one model (one fold)",
    "predict": "predict the test (or a train fold) split from checkpoints",
    "ensemble": "average prediction CSVs into a submission",
    "recipe": "train every model of an ensemble config, predict and ensemble",
    "schedule": "print or plot the learning-rate schedule of a config",
    "convert_keras": "convert Keras ResNet152V2 ImageNet weights to safetensors",
    "demo": "the whole job on generated data, on CPU, in minutes",
    "configs": "list the configs shipped with the package (names for --config)",
}


def command(name: str) -> ModuleType:
    """The module of command `name` (one of COMMANDS)."""
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}")
    return importlib.import_module(f"leaf_xla.commands.{name}")


def parse_command_line(argv: Sequence[str]) -> object:
    """Parse `leaf-xla COMMAND OPTIONS...` (without the `leaf-xla`) as the command would, running
    nothing: a bad line is a UserError; returns what the command's parser returns. The docs
    test checks every command line shown with it."""
    if not argv:
        raise UserError("no command")
    module = command(argv[0])
    parse = getattr(module, "parse", None) or module.build_parser().parse_args
    return parse(list(argv[1:]))
