"""The `leaf-xla` console script and the error handling every entry point shares.

`leaf-xla train ...` and `python -m leaf_xla train ...` run `python -m leaf_xla.train ...`:
each subcommand is a module with a `main(argv)` function (`configs` is `leaf_xla.config`'s).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

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
MODULES = {"configs": "config"}  # commands whose module has another name


class UserError(Exception):
    """An expected mistake in the user's input: reported as one line, no traceback."""


class SettingError(UserError):
    """A bad value of one named setting (a function's argument, a config key).

    Library code names the setting (`decay must be in (0, 1]`), as a notebook or the recipe
    calls it; a command line reports the flag that set it (`--decay must be in (0, 1]`),
    since every CLI option is named after its setting.
    """

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem

    def as_flag(self) -> str:
        return f"--{self.setting.replace('_', '-')} {self.problem}"


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point; turn `UserError` into `error: ...` on stderr and exit code 2."""
    try:
        main(argv)
    except SettingError as err:
        print(f"error: {err.as_flag()}", file=sys.stderr)
        sys.exit(2)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
        print("usage: leaf-xla COMMAND [options]   (COMMAND --help for its options)\n")
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    module = importlib.import_module(f"leaf_xla.{MODULES.get(argv[0], argv[0])}")
    run(module.main, argv[1:])
