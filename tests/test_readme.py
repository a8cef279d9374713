"""The README is a front page that cannot promise what does not exist: every `make X` it names is a target, every
`neoxrt SUB --flag` a subcommand and an option of it, and every link in README.md and docs/*.md reaches a file and
heading that exist."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from neoxrt.cli import build_parser
from neoxrt.cli_reference import _subparsers

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)


def code_lines(text: str) -> list[str]:
    """Inline code spans and the lines of code blocks, shell comments cut off."""
    lines = []
    for block, span in CODE.findall(text):
        lines += [line.split(" #")[0] for line in block.splitlines()] if block else [span]
    return lines


def options() -> dict[str, set[str]]:
    """{subcommand: its option strings} from the parsers the CLI runs."""
    return {name: {flag for action in sub._actions for flag in action.option_strings}
            for name, _, sub in _subparsers(build_parser())}


def test_the_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 120


def test_every_neoxrt_command_and_flag_the_readme_names_exists():
    known, text = options(), README.read_text(encoding="utf-8")
    named = [(m[1], m[2]) for line in code_lines(text) for m in re.finditer(r"\bneoxrt ([a-z][a-z-]*)([^|;]*)", line)]
    assert named, "no neoxrt command found in the README"
    for command, rest in named:
        assert command in known, f"README names `neoxrt {command}`, not a subcommand"
        for flag in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", rest):
            assert flag in known[command], f"README names `neoxrt {command} {flag}`, not an option of it"
    every = set().union(*known.values())
    for flag in {f for line in code_lines(text) for f in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", line)}:
        assert flag in every, f"README names {flag}, an option of no subcommand"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_every_make_target_the_readme_names_exists():
    targets = sorted({m for line in code_lines(README.read_text(encoding="utf-8"))
                      for m in re.findall(r"\bmake ([a-z][a-z0-9-]*)", line)})
    assert "demo" in targets and "docs" in targets
    for target in targets:
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"make -n {target}: {done.stderr.strip()}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_reaches_a_file_and_heading(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            headings = {slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)}
            assert anchor in headings, f"{page.name} links to {target}: no such heading"
