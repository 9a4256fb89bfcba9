"""YAML config files: finding one by name, reading it, writing a run's resolved config.

The configs shipped with the package live in `leaf_xla/configs/` (package data, so they are in
the wheel too) and are found by name: `--config tf_efficientnet_b7` (`leaf-xla configs` lists
them). Their values become the options' defaults in commands/options.py.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from leaf_xla.errors import UserError, not_a_command
from leaf_xla.files import atomic_write_text


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


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """Settings as YAML (and a checkpoint) hold them: paths as strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def save_config(settings: dict[str, Any], path: Path) -> None:
    """The resolved config: every setting's final value, loadable again with `--config`."""
    values = plain(settings)
    values.pop("config", None)
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def summary(path: Path) -> str:
    """The first sentence of a config's leading comment, which says what it is for."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    end = re.search(r"\.(?=\s|$)", text)
    return text[: end.end()] if end else text


if __name__ == "__main__":  # the command is leaf_xla/commands/configs.py
    not_a_command("leaf_xla.config", "configs")
