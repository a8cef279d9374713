"""Published numbers rendered from committed results, so a table in the docs cannot drift from its measurement.

    python -m neoxrt.docs_render            rewrite every rendered block (make docs)
    python -m neoxrt.docs_render --check    exit 1 when a block differs from its result, names a missing result, or
                                            a result has no block (a test)

A result is `docs/results/NAME.json`, written by a benchmark's `--results` (`neoxrt.bench.results.write_result`):
its figures (`columns`, `rows`), the reference rows measured in the same run, the command, commit, CPU model and
flags, and the date. In README.md and docs/*.md the text between `<!-- results:NAME -->` and
`<!-- /results:NAME -->` is that result's table and one line naming where it came from; the text between
`<!-- headline:NAME,NAME -->` and `<!-- /headline -->` is one row per `headline` entry of those results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
FIELDS = ("name", "title", "columns", "rows", "reference", "reference_rows", "headline", "command", "commit", "cpu",
          "date", "notes")
HEADLINE_FIELDS = ("measure", "neoxrt", "reference", "ratio")
BLOCK = re.compile(r"<!-- results:(?P<name>[\w.-]+) -->\n.*?<!-- /results:(?P=name) -->", re.S)
HEADLINE = re.compile(r"<!-- headline:(?P<names>[\w.,-]+) -->\n.*?<!-- /headline -->", re.S)


class ResultError(ValueError):
    """A result file that does not hold what the renderer reads, or a marker naming no result."""


def check_result(result: dict) -> dict:
    """`result` itself when it has every field and each row has one cell per column; else ResultError naming it."""
    name = result.get("name", "?")
    missing = [f for f in FIELDS if f not in result]
    if missing:
        raise ResultError(f"result {name}: missing fields {missing}")
    width = len(result["columns"])
    for row in [*result["rows"], *result["reference_rows"]]:
        if len(row) != width:
            raise ResultError(f"result {name}: a row has {len(row)} cells, the columns {width}: {row}")
    for entry in result["headline"]:
        if sorted(entry) != sorted(HEADLINE_FIELDS):
            raise ResultError(f"result {name}: a headline entry has {sorted(entry)}, expected {sorted(HEADLINE_FIELDS)}")
    return result


def load(name: str, results_dir: Path = RESULTS_DIR) -> dict:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        raise ResultError(f"no result {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                          f"(run the benchmark with --results {name}, or remove the marker)")
    result = check_result(json.loads(path.read_text(encoding="utf-8")))
    if result["name"] != name:
        raise ResultError(f"{path}: name {result['name']!r}, expected {name!r}")
    return result


def _cell(value) -> str:
    return "-" if value is None else " ".join(str(value).split()).replace("|", "\\|")


def _link(name: str, page: Path, results_dir: Path) -> str:
    return f"[{name}.json]({Path(os.path.relpath(results_dir / f'{name}.json', page.parent)).as_posix()})"


def provenance(result: dict) -> str:
    cpu = result["cpu"]
    flags = f" ({' '.join(cpu['flags'])})" if cpu.get("flags") else ""
    return f"`{result['command']}`, commit {result['commit']}, {cpu['model']}{flags}, {result['date']}"


def render_table(result: dict, page: Path, results_dir: Path = RESULTS_DIR) -> str:
    """The block's body: the table (reference rows last, marked), then where it came from, then the notes."""
    lines = ["| " + " | ".join(_cell(c) for c in result["columns"]) + " |", "|---" * len(result["columns"]) + "|"]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    for row in result["reference_rows"]:
        lines.append("| " + " | ".join([_cell(row[0]) + " (reference)", *(_cell(c) for c in row[1:])]) + " |")
    reference = f" Reference: {result['reference']}." if result["reference"] else ""
    lines += ["", f"Measured: {provenance(result)} ({_link(result['name'], page, results_dir)}).{reference}"]
    if result["notes"]:
        lines += ["", result["notes"]]
    return "\n".join(lines) + "\n"


def render_headline(results: list[dict], page: Path, results_dir: Path = RESULTS_DIR) -> str:
    lines = ["| measured | neoxrt | reference, same run | ratio | result |", "|---|---|---|---|---|"]
    for result in results:
        for e in result["headline"]:
            lines.append(f"| {_cell(e['measure'])} | {_cell(e['neoxrt'])} | {_cell(e['reference'])} | {_cell(e['ratio'])} | "
                         f"{_link(result['name'], page, results_dir)}, {result['date'][:10]} |")
    return "\n".join(lines) + "\n"


def render_page(text: str, page: Path, results_dir: Path = RESULTS_DIR) -> str:
    """`text` with every block replaced by what its result renders to; ResultError for a marker with no result."""

    def block(match: re.Match) -> str:
        name = match["name"]
        body = render_table(load(name, results_dir), page, results_dir)
        return f"<!-- results:{name} -->\n{body}<!-- /results:{name} -->"

    def headline(match: re.Match) -> str:
        results = [load(n, results_dir) for n in match["names"].split(",")]
        return f"<!-- headline:{match['names']} -->\n{render_headline(results, page, results_dir)}<!-- /headline -->"

    return HEADLINE.sub(headline, BLOCK.sub(block, text))


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def marked(text: str) -> set[str]:
    """The results a page's blocks name (table blocks only: every result needs its full table somewhere)."""
    return {m["name"] for m in BLOCK.finditer(text)}


def problems(root: Path = ROOT, results_dir: Path = RESULTS_DIR) -> list[str]:
    """What `--check` reports: stale blocks, markers naming no result, results no page renders."""
    found, used = [], set()
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        used |= marked(text)
        try:
            if render_page(text, page, results_dir) != text:
                found.append(f"{page.relative_to(root)}: a rendered table differs from its result (run make docs)")
        except ResultError as exc:
            found.append(f"{page.relative_to(root)}: {exc}")
    for path in sorted(results_dir.glob("*.json")):
        if path.stem not in used:
            found.append(f"{path.relative_to(root)}: no page has a <!-- results:{path.stem} --> block")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neoxrt.docs_render", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale or a result unused, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    for page in pages():
        text = page.read_text(encoding="utf-8")
        try:
            new = render_page(text, page)
        except ResultError as exc:
            print(f"{page.relative_to(ROOT)}: {exc}", file=sys.stderr)
            return 2
        if new != text:
            tmp = page.with_name(f".{page.name}.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
