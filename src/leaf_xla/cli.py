"""The `leaf-xla` console script: it runs a command (`leaf-xla train ...` and
`python -m leaf_xla train ...` run `leaf_xla.commands.train.main`) and turns an expected
mistake into one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence

from leaf_xla.commands import COMMANDS, command
from leaf_xla.errors import SettingError, UserError


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
    except KeyboardInterrupt as err:  # it may say what was saved and how to go on
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
        print("usage: leaf-xla COMMAND [options]   (COMMAND --help for its options)\n")
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            print(f"\nerror: unknown command {argv[0]!r}{hint}", file=sys.stderr)
            sys.exit(2)
        return
    run(command(argv[0]).main, argv[1:])
