"""The errors leaf_xla reports to a user as one line: expected mistakes, never bugs.

Library code raises them; the console script (leaf_xla.cli.run) prints `error: ...` and exits
with 2, and a failed replica's error reaches the launching process as the same one line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

IDS_SHOWN = 3  # ids named in one error line before "and N more"


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


def first_few(values: Sequence[object], shown: int = IDS_SHOWN) -> str:
    """`a, b, c and 4 more`: the values an error line names."""
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return ", ".join(map(str, values[:shown])) + more


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message in one line (its first), for an error line that quotes it."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def not_a_command(module: str, command: str) -> NoReturn:
    """`python -m leaf_xla.train`, the form before the commands moved to leaf_xla/commands/:
    one line saying what to run, not a library module that runs and does nothing."""
    print(
        f"error: {module} is the library; the command is `leaf-xla {command} ...` "
        f"(or `python -m leaf_xla {command} ...`)",
        file=sys.stderr,
    )
    raise SystemExit(2)
