"""YAML configs as argparse defaults: validation of keys and types, CLI precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import assert_user_error, run_cli

from leaf_xla.commands.options import parse_args
from leaf_xla.commands.train import build_parser
from leaf_xla.config import shipped_configs
from leaf_xla.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_sets_defaults_and_cli_wins(tmp_path) -> None:
    path = write(tmp_path, "epochs: 7\nbatch_size: 4\nlr_max: 0.001\npretrained: false\n")
    args = parse_args(build_parser(), ["--config", str(path), "--epochs", "3"])
    assert (args.epochs, args.batch_size, args.lr_max, args.pretrained) == (3, 4, 0.001, False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown key 'epoch' (did you mean 'epochs'?)"),
        ("epochs: three\n", "key 'epochs' must be a number"),
        ("epochs: 2.5\n", "must be a whole number"),
        ("pretrained: 1\n", "must be true or false"),
        ("device: tpu\n", "must be one of auto, xla, cpu, cuda"),
        ("- a\n- b\n", "expected a mapping"),
        ("epochs: [1\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError, match="cfg.yaml") as err:
        parse_args(build_parser(), ["--config", str(path)])
    assert message in str(err.value)


def test_bad_config_through_the_cli(tmp_path, pp2020) -> None:
    path = write(tmp_path, "learning_rate: 0.1\n")
    result = run_cli(
        "leaf_xla",
        "train",
        "--config",
        str(path),
        "--model",
        "test_resnet",
        "--data-dir",
        str(pp2020),
    )
    assert_user_error(result, "unknown key 'learning_rate'", str(path))


def test_shipped_configs_are_valid() -> None:
    for path in shipped_configs().values():
        if "models" in yaml.safe_load(path.read_text()):
            continue  # ensemble configs: checked by the recipe tests
        args = parse_args(build_parser(), ["--config", str(path)])
        assert args.epochs >= 1, path


def test_configs_by_name() -> None:
    args = parse_args(build_parser(), ["--config", "tf_efficientnet_b7"])
    assert (args.model, args.image_size, args.precision) == ("tf_efficientnet_b7", 512, "bf16")
