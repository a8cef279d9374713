"""docs/CLI.md rendered from the argparse parsers themselves, so the reference cannot drift from the options.

    python -m neoxrt.cli_reference docs/CLI.md            write it (make docs)
    python -m neoxrt.cli_reference docs/CLI.md --check    exit 1 when the file differs from the parsers (a test)

Rendered from each action's flags, metavar, default, choices and help (not from `format_help`, whose wrapping
follows the terminal's width), one section per subcommand in `neoxrt --help` order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEADER = """# neoxrt command reference

Generated from the argparse parsers by `make docs` (`python -m neoxrt.cli_reference docs/CLI.md`); a test fails
when this page differs from them. `neoxrt bench` has its own options: `neoxrt bench --help`.
"""


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in action._choices_actions}
    return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    value = ""
    if action.nargs != 0:
        value = " " + (action.metavar if isinstance(action.metavar, str) else action.dest.upper())
    return ", ".join(f"`{flag}{value}`" for flag in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
        return ""
    return f"`{action.default}`"


def render_command(name: str, summary: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## neoxrt {name}", "", _cell(summary), "", "| argument | default | choices | meaning |",
             "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
        lines.append(f"| {_flags(action)} | {_default(action)} | {choices} | {_cell(action.help or '')} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    from neoxrt.cli import build_parser

    sections = [render_command(name, summary, sub) for name, summary, sub in _subparsers(build_parser())
                if name != "bench"]
    return HEADER + "\n" + "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neoxrt.cli_reference", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale, write nothing")
    args = parser.parse_args(argv)
    text = render()
    current = args.path.read_text(encoding="utf-8") if args.path.is_file() else None
    if args.check:
        if current != text:
            print(f"{args.path} is stale: run make docs", file=sys.stderr)
            return 1
        return 0
    if current != text:
        tmp = args.path.with_name(f".{args.path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
