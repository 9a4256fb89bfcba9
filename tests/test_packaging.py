"""The package as a user installs it: a wheel built from the project, installed into a fresh
virtualenv without the source tree on the path, runs the demo with its shipped configs."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO, assert_user_error, run_cli

from leaf_xla.config import find_config, shipped_configs


def test_shipped_configs_are_found_by_name_and_legacy_path(tmp_path) -> None:
    shipped = shipped_configs()
    assert {"demo", "demo_ensemble", "ensemble", "tf_efficientnet_b7"} <= set(shipped)
    assert all(path.is_file() and path.suffix == ".yaml" for path in shipped.values())
    assert find_config("demo") == find_config("demo.yaml") == shipped["demo"]
    assert find_config("configs/ensemble.yaml") == shipped["ensemble"]
    own = tmp_path / "demo.yaml"  # a user's own file wins over the shipped one of that name
    own.write_text("epochs: 1\n")
    assert find_config(str(own)) == own


def test_configs_command_lists_names_and_what_they_are() -> None:
    result = run_cli("leaf_xla", "configs")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    assert set(lines) == set(shipped_configs())
    assert lines["demo"].startswith("Tiny models on small synthetic images")
    paths = run_cli("leaf_xla", "configs", "--paths").stdout.split()
    assert str(shipped_configs()["ensemble"]) in paths


def test_unknown_config_names_the_shipped_ones(tmp_path) -> None:
    result = run_cli("leaf_xla", "schedule", "--config", "tf_efficientnet_b9")
    assert_user_error(result, "config file tf_efficientnet_b9 not found", "tf_efficientnet_b7")


def _has_build_backend() -> bool:
    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except metadata.PackageNotFoundError:
        return False
    return major >= 77  # as [build-system] requires


def _run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_without_the_source_tree(tmp_path) -> None:
    # No PYTHONPATH: the tests run with the source tree on it, a user's install does not.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)]
    # Offline with the build backend pyproject.toml asks for (the test extra installs it);
    # else pip fetches it from the index, as a user's `pip install .` does.
    if _has_build_backend():
        build.insert(4, "--no-build-isolation")
    _run(build, tmp_path, env)
    (wheel,) = wheels.glob("leaf_xla-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    python, console = venv / "bin" / "python", venv / "bin" / "leaf-xla"
    # The dependencies (torch, timm, ...) come from this interpreter's site-packages, which a
    # venv made from inside a venv does not see; a plain path line in a .pth does not run the
    # editable install's hook, so leaf_xla itself can only come from the wheel.
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        tmp_path,
        env,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    Path(purelib, "parent_site.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp_path,
        env,
    )

    work = tmp_path / "work"  # not the checkout: no configs/ folder beside the command
    work.mkdir()
    where = _run([str(python), "-c", "import leaf_xla; print(leaf_xla.__file__)"], work, env)
    assert where.stdout.strip().startswith(purelib), where.stdout

    listing = _run([str(console), "configs"], work, env).stdout
    assert {line.split()[0] for line in listing.splitlines()} >= {"demo", "demo_ensemble"}
    demo = _run(
        [
            str(console),
            "demo",
            "--out-dir",
            "demo",
            "--n-train",
            "64",
            "--n-test",
            "6",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ],
        work,
        env,
    )
    assert (work / "demo" / "submission.csv").is_file(), demo.stdout[-2000:]
    assert "submission:" in demo.stdout
