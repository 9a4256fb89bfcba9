"""Train one model on one fold; everything a later resume, prediction or ensemble needs lands in
the run directory.

    leaf-xla train --config tf_efficientnet_b7 --data-dir data/plant-pathology-2020-fgvc7 \\
        --out-dir runs

Run directory (<out-dir>/<model>-fold<k>): best.pt, last.pt (and last.prev.pt, the one before),
config.yaml (config.resumes.yaml: what each resume changed), history.csv, oof.csv, tb/
(TensorBoard), plots/*.png. `--resume` continues from last.pt after a kill or preemption.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from leaf_xla.commands.options import add_train_options, parse_args, train_settings
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.settings import check_data_dir


def build_parser(prog: str = "leaf-xla train", description: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0])
    add_train_options(parser)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    return parse_args(build_parser(), argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = train_settings(parse(argv))
    check_data_dir(settings.data.data_dir)
    from leaf_xla.train import Interrupted, fit  # torch, timm: after the arguments are checked

    try:
        fit(settings)
    except Interrupted as err:
        raise KeyboardInterrupt(resume_advice(err.run_dir, argv)) from None


def resume_advice(run_dir: Path, argv: Sequence[str]) -> str:
    """What a Ctrl-C leaves: the checkpoint that holds the run's state and the command that
    continues it."""
    from leaf_xla.rundir import LAST

    last = run_dir / LAST
    if not last.is_file():
        return f"nothing was saved to {run_dir} yet: run the same command again to start over"
    again = [a for a in argv if a not in ("--overwrite", "--resume")]
    command = shlex.join(["python", "-m", "leaf_xla", "train", *again, "--resume"])
    return f"{last} holds the run's last saved state; continue it with:\n  {command}"
