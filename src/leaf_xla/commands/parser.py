"""The parser of every command: a bad command line is one line (an unknown option named with the
closest real one), and --help shows every option's default. Standard library only, so that
--help costs nothing."""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from leaf_xla.errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, once: added where the help does not say it. The
    description and epilog keep their lines (a module docstring's layout)."""

    def _format_action(self, action: argparse.Action) -> str:
        help_text = _help_with_default(action)
        if help_text != action.help:
            action = copy.copy(action)
            action.help = help_text
        return super()._format_action(action)


def _help_with_default(action: argparse.Action) -> str | None:
    default = action.default
    if (
        action.help == argparse.SUPPRESS
        or default in (None, argparse.SUPPRESS)
        or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))
        or (isinstance(default, (list, tuple, str)) and not default)
        or re.search(r"\bdefault\b|%\(default\)", action.help or "", re.IGNORECASE)
    ):
        return action.help
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    shown = f"(default: {shown})".replace("%", "%%")
    return f"{action.help} {shown}" if action.help else shown


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every command: a bad command line is one `UserError` line (an unknown
    option named with the closest real one), not the usage followed by the error, and
    `--help` shows every option's default."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        # Before argparse: it reports a missing required option first, and an unknown one
        # only after the whole usage.
        for token in argv[: argv.index("--")] if "--" in argv else argv:
            flag = token.split("=", 1)[0]
            if self._is_unknown_option(flag):
                raise UserError(f"unknown option {flag}{self._closest_option(flag)}")
        return super().parse_args(argv, namespace)

    def _is_unknown_option(self, flag: str) -> bool:
        """A token argparse would take for an option it does not know (as its parser does:
        negative numbers and strings with spaces are values; long options may be shortened)."""
        known = self._option_string_actions
        if len(flag) < 2 or flag[0] not in self.prefix_chars or flag in known or " " in flag:
            return False
        if self._negative_number_matcher.match(flag):
            return False
        if flag.startswith("--"):
            return not (self.allow_abbrev and any(o.startswith(flag) for o in known))
        return flag[:2] not in known  # -cFILE: a short option with its value attached

    def _closest_option(self, flag: str) -> str:
        options = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{hint} ({self.prog} --help lists the options)"

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} ({self.prog} --help lists the options)")
