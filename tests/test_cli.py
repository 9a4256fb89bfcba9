"""The command lines themselves: a mistyped option is one line naming the closest real one,
and --help shows every option's default once."""

from __future__ import annotations

import importlib
import re

import pytest
from conftest import assert_user_error, run_cli

from leaf_xla.commands import COMMANDS, command
from leaf_xla.commands.parser import ArgumentParser
from leaf_xla.errors import UserError


@pytest.fixture
def parsers() -> dict[str, ArgumentParser]:
    """Every command's parser."""
    return {name: command(name).build_parser() for name in COMMANDS}


def _entries(help_text: str) -> dict[str, str]:
    """--help's entry of each option, by its first option string."""
    entries = {}
    for entry in re.split(r"\n(?=  -)", help_text):
        first = entry.strip().split()[0].rstrip(",")
        if first.startswith("-"):
            entries[first] = " ".join(entry.split())
    return entries


def test_every_option_of_every_command_shows_its_default_once(parsers):
    for name, parser in parsers.items():
        entries = _entries(parser.format_help())
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            entry = entries[action.option_strings[0]]
            assert len(re.findall(r"default", entry, re.IGNORECASE)) <= 1, (name, entry)
            default = action.default
            if default in (None, False, []) or isinstance(default, bool) and not default:
                continue
            assert re.search(r"default", entry, re.IGNORECASE), (name, entry)
    train = _entries(parsers["train"].format_help())
    for option, shown in [("--epochs", "20"), ("--optimizer", "adam"), ("--seed", "0")]:
        assert train[option].endswith(f"(default: {shown})"), train[option]
    assert "(default: None)" not in parsers["train"].format_help()


def test_recipe_help_shows_the_yaml_schema_and_the_pass_through(parsers):
    text = parsers["recipe"].format_help()
    for key in ("folds:", "tta:", "fit_weights:", "models:", "name:", "weight:", "args:"):
        assert re.search(rf"^ +(- )?{key}( |$)", text, re.MULTILINE), key
    assert "[-- TRAIN OPTIONS...]" in text and "Options after `--` go to every train run" in text


def test_configs_lists_whole_sentences(capsys):
    importlib.import_module("leaf_xla.commands.configs").main([])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 3
    for line in lines:
        assert line.endswith("."), line
    ensemble = next(line for line in lines if line.startswith("ensemble "))
    assert ensemble.endswith("averaged with hand-picked weights.")


def test_an_unknown_option_names_the_closest_real_one_in_every_command(parsers, monkeypatch):
    monkeypatch.undo()  # the real parse_args
    for parser in parsers.values():
        with pytest.raises(UserError, match=r"^unknown option --no-such-option \("):
            parser.parse_args(["--no-such-option", "1"])
    with pytest.raises(UserError, match="unknown option --batch-sise; did you mean --batch-size?"):
        parsers["predict"].parse_args(["--batch-sise", "3"])
    # What argparse takes for values or shortened options is not called unknown.
    args = parsers["train"].parse_args(["--mean", "-0.5", "0", "1", "--epo", "3", "-cdemo"])
    assert (args.mean, args.epochs, args.config) == ([-0.5, 0.0, 1.0], 3, "demo")


def test_typos_from_the_command_line_are_one_line():
    result = run_cli("leaf_xla", "train", "--img-size", "48", "--model", "test_resnet")
    assert_user_error(result, "unknown option --img-size; did you mean --image-size?")
    assert "usage" not in result.stderr
    # The required --checkpoint is missing too: the typo is what the user needs to hear.
    result = run_cli("leaf_xla", "predict", "--checkpoints", "best.pt", "--data-dir", "d")
    assert_user_error(result, "unknown option --checkpoints; did you mean --checkpoint?")
    result = run_cli("leaf_xla", "train", "--epochs", "three")
    assert_user_error(result, "argument --epochs: invalid int value: 'three'")
    result = run_cli("leaf_xla", "trian")
    assert "unknown command 'trian'; did you mean train?" in result.stderr
    assert result.returncode == 2
