"""The documents cannot rot: every command line they show parses, every relative link resolves.

A command line is a line of a shell code block of README.md or docs/*.md (``` with no language,
bash, sh, shell or console), `\\` continuations joined and `#` comments dropped, that runs
`leaf-xla ...`, `python -m leaf_xla ...` (also after `torchrun ... -m leaf_xla`, behind `VAR=value`
prefixes, after `&&`, or inside a quoted `--command "..."`) or `python bench/X.py ...`. Each is
parsed, never run: leaf_xla's by `leaf_xla.commands.parse_command_line`, a bench script's by its
own `build_parser()`. A line is skipped only for one of the reasons in `SKIP_REASONS`, and pytest
lists every skipped line with its reason (`-ra`).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SKIP_REASONS = {
    "elided": "options elided with `...`: not a whole command line",
    "placeholder": "a `<placeholder>` stands for a value the reader fills in",
    "outside": "the script is not in this repository",
}


@dataclass(frozen=True)
class Shown:
    """One command line a document shows."""

    where: str  # file:line of the line's start
    text: str  # the logical line, continuations joined
    program: str  # "leaf-xla", a bench script's path, or "python -m leaf_xla.X"
    argv: tuple[str, ...]  # the words after the program
    skip: str = ""  # a key of SKIP_REASONS, or ""


def code_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of a Markdown file's shell code blocks."""
    fence: str | None = None
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None
            pending = ""
            continue
        if fence is None or fence not in SHELL_FENCES:
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def split_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at `&&`, `;`, `|`), comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def _skip_reason(argv: list[str]) -> str:
    if "..." in argv:
        return "elided"
    if any("<" in word or ">" in word for word in argv):
        return "placeholder"
    return ""


def shown_in(words: list[str], where: str, text: str) -> Iterator[Shown]:
    """The leaf_xla and bench command lines of one simple command's words."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return
    program, rest = words[0], words[1:]
    if program == "leaf-xla":
        yield Shown(where, text, "leaf-xla", tuple(rest), _skip_reason(rest))
        return
    if "-m" in rest and rest.index("-m") + 1 < len(rest):  # python -m, python3 -m, torchrun -m
        at = rest.index("-m") + 1
        module, argv = rest[at], rest[at + 1 :]
        if module == "leaf_xla":
            yield Shown(where, text, "leaf-xla", tuple(argv), _skip_reason(argv))
        elif module.startswith("leaf_xla."):
            yield Shown(where, text, f"python -m {module}", tuple(argv), _skip_reason(argv))
        return
    if program in ("python", "python3") and rest and rest[0].endswith(".py"):
        script, argv = rest[0], rest[1:]
        skip = "outside" if Path(script).is_absolute() else _skip_reason(argv)
        yield Shown(where, text, script, tuple(argv), skip)
        return
    for word in rest:  # a command handed on as one word: gcloud ... --command "..."
        if " " in word and ("leaf-xla " in word or "leaf_xla" in word):
            for command in split_commands(word):
                yield from shown_in(command, where, text)


def collect(paths: list[Path]) -> list[Shown]:
    found = []
    for path in paths:
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        for number, text in code_lines(path):
            for command in split_commands(text):
                found.extend(shown_in(command, f"{name}:{number}", text))
    return found


SHOWN = collect(DOCS)


def _params(bench: bool) -> list:
    """One pytest case per command line; a skipped one says why, and which line it is."""
    params = []
    for shown in SHOWN:
        if shown.program.endswith(".py") != bench:
            continue
        marks = ()
        if shown.skip:
            reason = f"{shown.where}: {SKIP_REASONS[shown.skip]}: {shown.text.strip()}"
            marks = pytest.mark.skip(reason=reason)
        params.append(pytest.param(shown, id=shown.where, marks=marks))
    return params


def _fail(shown: Shown, problem: str) -> None:
    pytest.fail(f"{shown.where}: {shown.text.strip()}\n  {problem}", pytrace=False)


@pytest.mark.parametrize("shown", _params(bench=False))
def test_command_line_parses(shown: Shown) -> None:
    from leaf_xla.commands import parse_command_line
    from leaf_xla.errors import UserError

    if shown.program != "leaf-xla":
        command = shown.program.removeprefix("python -m leaf_xla.")
        _fail(shown, f"write it as `leaf-xla {command} ...`, the form this test checks")
    try:
        parse_command_line(list(shown.argv))
    except UserError as err:
        _fail(shown, str(err))


def _has_build_parser(script: Path) -> bool:
    tree = ast.parse(script.read_text())
    return any(
        isinstance(node, ast.FunctionDef) and node.name == "build_parser" for node in tree.body
    )


@pytest.mark.parametrize("shown", _params(bench=True))
def test_bench_command_line_parses(shown: Shown, monkeypatch: pytest.MonkeyPatch) -> None:
    script = REPO / shown.program
    if not script.is_file():
        _fail(shown, f"{shown.program} does not exist")
    if not _has_build_parser(script):
        return  # only its presence can be checked: the parser is built inside main()
    monkeypatch.syspath_prepend(str(script.parent))  # bench scripts import their neighbours
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.build_parser().parse_args(list(shown.argv))
    except SystemExit as err:  # argparse's way of refusing a command line
        _fail(shown, f"argparse refused it (exit {err.code}); see the error printed above")


def test_the_readme_shows_the_main_job() -> None:
    """The collector finds the README's commands (so an empty collection cannot pass)."""
    readme = [s for s in SHOWN if s.where.startswith("README.md") and s.program == "leaf-xla"]
    commands = {s.argv[0] for s in readme if s.argv}
    assert {"check", "prepare", "convert_keras", "recipe", "train", "predict"} <= commands


def test_collector(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```bash\n"
        "# leaf-xla train --not-collected\n"
        "PJRT_DEVICE=TPU leaf-xla train --model m \\\n"
        "    --fold 1  # a comment\n"
        "cd x && python -m leaf_xla predict --out 'a b.csv'\n"
        "torchrun --nproc-per-node 4 -m leaf_xla train --parallel ddp\n"
        "python -m leaf_xla.check --data-dir d\n"
        "leaf-xla train ... --epochs 2\n"
        "git clone <this repo> && leaf-xla check --data-dir <data>\n"
        'gcloud ssh --command "cd y && leaf-xla recipe --config demo"\n'
        "python bench/decode.py --data /tmp/x\n"
        "python /path/to/make_jpegs.py --n 2\n"
        "```\n"
        "```yaml\n"
        "leaf-xla train --in-yaml\n"
        "```\n"
        "leaf-xla train --in-prose\n"
    )
    found = [(s.where.split(":")[-1], s.program, list(s.argv), s.skip) for s in collect([doc])]
    assert found == [
        ("3", "leaf-xla", ["train", "--model", "m", "--fold", "1"], ""),
        ("5", "leaf-xla", ["predict", "--out", "a b.csv"], ""),
        ("6", "leaf-xla", ["train", "--parallel", "ddp"], ""),
        ("7", "python -m leaf_xla.check", ["--data-dir", "d"], ""),
        ("8", "leaf-xla", ["train", "...", "--epochs", "2"], "elided"),
        ("9", "leaf-xla", ["check", "--data-dir", "<data>"], "placeholder"),
        ("10", "leaf-xla", ["recipe", "--config", "demo"], ""),
        ("11", "bench/decode.py", ["--data", "/tmp/x"], ""),
        ("12", "/path/to/make_jpegs.py", ["--n", "2"], "outside"),
    ]


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a Markdown file outside its code blocks."""
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            yield number, line


def anchors(path: Path) -> set[str]:
    """The `#fragment`s GitHub gives a Markdown file's headings."""
    found = set()
    for _, line in prose_lines(path):
        if heading := re.match(r"^#{1,6}\s+(.*?)\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            found.add(slug)
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link names a file that exists, and a `#fragment` one of its headings."""
    broken = []
    for number, line in prose_lines(path):
        for match in LINK.finditer(line):
            target, _, fragment = (match.group(1) or match.group(2)).partition("#")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # a URL
                continue
            file = path.parent / target if target else path
            if not file.exists():
                broken.append(f"{path.name}:{number}: {target} does not exist")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                broken.append(f"{path.name}:{number}: {target} has no heading #{fragment}")
    assert not broken, "broken links:\n" + "\n".join(broken)
