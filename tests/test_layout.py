"""The package's shape: commands on top of the library, no import cycles, commands that answer
--help before torch is loaded, and functions and modules a reader can take in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import leaf_xla
from leaf_xla.commands import COMMANDS

PACKAGE = Path(leaf_xla.__file__).parent
TOP = ("leaf_xla.cli", "leaf_xla.__main__")  # the console script, over the commands
LONGEST_FUNCTION = 60  # lines; option tables (add_*_options) may be longer
LONGEST_MODULE = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The leaf_xla modules `path` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("leaf_xla")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("leaf_xla"):
            for alias in node.names:  # `from leaf_xla import rundir` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(
                    sub
                    if (PACKAGE.parent / sub.replace(".", "/")).exists()
                    or (PACKAGE.parent / f"{sub.replace('.', '/')}.py").exists()
                    else node.module
                )
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def is_command(module: str) -> bool:
    return module.startswith("leaf_xla.commands") or module in TOP


def test_no_library_module_imports_a_command():
    for module, imported in graph().items():
        if not is_command(module):
            upward = sorted(m for m in imported if is_command(m))
            assert not upward, f"{module} imports {upward}: the library is under the commands"


def test_the_imports_have_no_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(edges.get(module, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [module, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


HEAVY = ("torch", "timm", "torch_xla", "albumentations", "sklearn", "cv2")
PARSE_ONLY = """
import sys
from leaf_xla.cli import main
for argv in ([sys.argv[1], "--help"], [sys.argv[1], "--no-such-option"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = [m for m in {heavy} if m in sys.modules]
assert not heavy, heavy
"""


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_answers_help_and_bad_options_before_importing_torch(name):
    """Issue 22.7: `leaf-xla COMMAND --help` and a mistyped option are answered without torch,
    timm or torch_xla (seconds of imports): the arguments are parsed first."""
    code = PARSE_ONLY.format(heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unknown option --no-such-option" in result.stderr


def test_functions_and_modules_fit_a_screen_or_two():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        assert source.count("\n") <= LONGEST_MODULE, f"{path.name}: split it"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("add_"):
                length = node.end_lineno - node.lineno + 1
                assert length <= LONGEST_FUNCTION, f"{path.name}: {node.name} is {length} lines"


def test_a_missing_data_folder_is_named_before_torch_is_imported(tmp_path):
    missing = str(tmp_path / "nope")
    argv = ["train", "--model", "test_resnet", "--data-dir", missing]
    code = (
        f"import sys\nfrom leaf_xla.cli import main\ntry:\n    main({argv!r})\n"
        "except SystemExit as stop:\n    assert stop.code == 2\n"
        f"heavy = [m for m in {HEAVY} if m in sys.modules]\nassert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == f"error: --data-dir {missing}: data directory not found\n"


def test_the_old_module_form_says_what_to_run():
    """`python -m leaf_xla.train`, the form before the commands moved: one line, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "leaf_xla.train", "--model", "x"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: leaf_xla.train is the library; the command is `leaf-xla train ...` "
        "(or `python -m leaf_xla train ...`)\n"
    )
