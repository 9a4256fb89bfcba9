"""YAML configs whose values become the defaults of an argparse CLI (the timm pattern).

`parse_args(parser, argv)` reads `--config FILE` first, checks every key of the file against the
parser's options (unknown keys and wrong value types are `UserError`s naming the file and key),
sets them as defaults, then parses the command line, which wins.

The configs shipped with the package live in `leaf_xla/configs/` (package data, so they are in
the wheel too) and are found by name: `--config tf_efficientnet_b7`.

    leaf-xla configs        # python -m leaf_xla.config: the shipped configs
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from leaf_xla.cli import ArgumentParser, UserError
from leaf_xla.files import atomic_write_text


def identity(group: Any, *flags: str, **kwargs: Any) -> argparse.Action:
    """`group.add_argument(*flags, **kwargs)` for a training option that is part of the run's
    identity: a `--resume` that changes it is refused (rundir.resume_identity). Every other
    training option is listed, with why its change is harmless, in rundir.NOT_IN_IDENTITY."""
    action = group.add_argument(*flags, **kwargs)
    action.identity = True
    return action


def identity_options(parser: argparse.ArgumentParser) -> list[str]:
    """The options of `parser` declared part of the run's identity (their `dest`s)."""
    return [action.dest for action in parser._actions if getattr(action, "identity", False)]


def shipped_configs() -> dict[str, Path]:
    """The configs inside the package, by name (the file name without `.yaml`)."""
    folder = resources.files("leaf_xla") / "configs"
    files = sorted(f.name for f in folder.iterdir() if f.name.endswith(".yaml"))
    # A wheel or editable install unpacks the package onto the disk: the entries are real files.
    return {name.removesuffix(".yaml"): Path(str(folder / name)) for name in files}


def find_config(name_or_path: str) -> Path:
    """A config file path, or the name of a shipped config (with or without .yaml).

    `configs/NAME.yaml`, the path in a source checkout before the configs moved into the
    package, still finds the shipped config when no such file exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if path.parent in (Path("."), Path("configs")):
        config = shipped.get(path.name.removesuffix(".yaml"))
        if config is not None:
            return config
    raise UserError(
        f"config file {name_or_path} not found: give a path to a YAML file or the name of a "
        f"shipped config ({', '.join(shipped)}; leaf-xla configs lists them)"
    )


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _check_value(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """Check one YAML value against the argparse option it sets; return it converted."""
    where = f"{path}: key {key!r}"
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction) or action.const in (True, False):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if getattr(action.type, "yaml_values", False):  # a type that reads lists too
        try:
            return action.type(value)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    if action.nargs in ("+", "*") and not isinstance(value, list):
        value = [value]
    values = value if isinstance(value, list) else [value]
    if action.nargs not in ("+", "*") and isinstance(value, list) and action.type is not yaml_value:
        raise UserError(f"{where} takes one value, got a list")
    converted = []
    for item in values:
        kind = action.type
        if kind in (int, float) and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise UserError(f"{where} must be a number, got {item!r}")
        if kind is int and isinstance(item, float) and not item.is_integer():
            raise UserError(f"{where} must be a whole number, got {item!r}")
        if kind in (int, float):
            item = kind(item)
        elif kind is yaml_value:
            pass
        elif not isinstance(item, (str, int, float)):
            raise UserError(f"{where} must be a string, got {item!r}")
        else:
            item = str(item)
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise UserError(f"{where} must be one of {choices}, got {item!r}")
        converted.append(item)
    return converted if isinstance(value, list) else converted[0]


def yaml_value(text: str) -> Any:
    """argparse type for structured options (lists, mappings) given on the command line as YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not valid YAML: {text!r} ({err})") from None


def apply_config(
    parser: argparse.ArgumentParser, path: Path, only_known_keys: bool = False
) -> dict[str, Any]:
    """Validate a YAML config against `parser` and set its values as the parser's defaults.

    `only_known_keys` skips the keys `parser` has no option for (a command that reads a part
    of another command's config), instead of calling them unknown.
    """
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    config = load_yaml(path)
    if "models" in config and "models" not in actions:
        raise UserError(
            f"{path} is an ensemble config (it lists models), not a training config: run it "
            f"with python -m leaf_xla.recipe --config {path}"
        )
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in actions and only_known_keys:
            continue
        if dest not in actions:
            close = difflib.get_close_matches(dest, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{path}: unknown key {key!r}{hint}; see --help for the options")
        values[dest] = _check_value(path, str(key), value, actions[dest])
    parser.set_defaults(**values)
    return values


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, only_known_keys: bool = False
) -> argparse.Namespace:
    """Parse `argv` with the values of `--config FILE` (if given) as defaults."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        apply_config(parser, find_config(known.config), only_known_keys)
    return parser.parse_args(argv)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="YAML file, or the name of a shipped config (leaf-xla configs), whose keys "
        "set option defaults",
    )


def save_config(args: argparse.Namespace, path: Path) -> None:
    """The resolved config: every option's final value, loadable again with `--config`."""
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    values.pop("config", None)
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def _summary(path: Path) -> str:
    """The first sentence of a config's leading comment, which says what it is for."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    end = re.search(r"\.(?=\s|$)", text)
    return text[: end.end()] if end else text


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="leaf-xla configs",
        description="List the configs shipped with leaf_xla: pass a name to --config.",
    )
    parser.add_argument("--paths", action="store_true", help="print each config's file path")
    args = parser.parse_args(argv)
    shipped = shipped_configs()
    width = max(map(len, shipped), default=0)
    for name, path in shipped.items():
        print(f"{name:<{width}}  {path if args.paths else _summary(path)}")


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
