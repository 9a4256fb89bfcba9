"""How long a command takes to answer --help and a mistyped option (issue 22.7), against the
bare imports it no longer waits for, measured in the same run.

    python bench/cli_startup.py [--repeats 5] [--commands train predict ...]

Each figure is the median wall time of a fresh `python -m leaf_xla COMMAND ...` process; the
baseline is `python -c "import torch, timm, torch_xla"`, what every command paid first before.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from leaf_xla.commands import COMMANDS

BASELINE = "import torch, timm\ntry:\n    import torch_xla\nexcept ImportError:\n    pass"


def seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    return parser


def main() -> None:
    args = build_parser().parse_args()
    baseline = seconds(["-c", BASELINE], args.repeats)
    print(f"baseline: import torch, timm, torch_xla: {baseline:.2f} s\n")
    print("| command | --help | a mistyped option |")
    print("|---|---|---|")
    for name in args.commands:
        shown = []
        for extra in ("--help", "--no-such-option"):
            took = seconds(["-m", "leaf_xla", name, extra], args.repeats)
            shown.append(f"{took:.2f} s ({took / baseline:.2f}x)")
        print(f"| {name} | {shown[0]} | {shown[1]} |")


if __name__ == "__main__":
    main()
