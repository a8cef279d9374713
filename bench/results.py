"""A benchmark's published result: `docs/results/NAME.json`, which `make docs` renders into the docs' tables.

    write_result("structured", "Structured outputs: per-token cost", columns, rows, command=..., reference=...)

Each file holds the figures (`columns`, `rows`), the reference rows measured in the same run, optional `headline`
entries for the README's table, and where they came from: the command, the commit (`-dirty` when tracked files
had changes), the CPU model and its avx/vnni/amx flags, the UTC date. The benchmarks write one with `--results`
(`add_results_flag`); the format is checked by `neoxrt.docs_render.check_result`, which renders it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from neoxrt.docs_render import RESULTS_DIR, check_result

CPU_FLAGS = ("avx", "amx")  # prefixes kept from /proc/cpuinfo's flags; any flag naming vnni is kept too


def commit() -> str:
    """`git rev-parse --short HEAD`, with `-dirty` when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """{"model": the first `model name`, "flags": its avx*, amx* and *vnni* flags, sorted}."""
    model, flags = "unknown", []
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        if key.strip() == "flags":
            flags = sorted({f for f in value.split() if f.startswith(CPU_FLAGS) or "vnni" in f})
            break
    return {"model": model, "flags": flags}


def command_line(module: str, argv: list[str] | None) -> str:
    """How the benchmark was run: `python -m MODULE ARGS` (the arguments given, or this process's)."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def write_result(name: str, title: str, columns: list[str], rows: list[list], *, command: str, reference: str = "",
                 reference_rows: list[list] = (), headline: list[dict] = (), notes: str = "",
                 measured: dict | None = None, results_dir: Path | None = None) -> Path:
    """Write `results_dir/NAME.json` atomically (a temporary file renamed into place) and return its path.

    Args:
        name: the file's stem, which the docs' `<!-- results:NAME -->` blocks name.
        title: what the table measures, one line.
        columns: the table's header; each row of `rows` and `reference_rows` has one cell per column.
        rows: the figures of what is measured (cells: numbers already rounded, strings, or None).
        command: the command line that measured them.
        reference: what the reference rows (or reference columns) are, e.g. "vLLM 0.32 in the same run".
        reference_rows: rows of the reference measured in the same run, rendered after `rows`.
        headline: entries {"measure", "neoxrt", "reference", "ratio"} for the README's headline table.
        notes: one paragraph rendered under the table.
        measured: {"commit", "cpu", "date"} of an earlier run whose output is converted (default: this process's).
        results_dir: where the file goes (default: docs/results, `RESULTS_DIR`).

    Raises:
        neoxrt.docs_render.ResultError: a row whose length differs from the columns'.
    """
    result = check_result({"name": name, "title": title, "columns": list(columns), "rows": [list(r) for r in rows],
                           "reference": reference, "reference_rows": [list(r) for r in reference_rows],
                           "headline": [dict(h) for h in headline], "command": command, "notes": notes,
                           **(measured or {"commit": commit(), "cpu": cpu(),
                                           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})})
    results_dir = RESULTS_DIR if results_dir is None else results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path} (make docs renders it)")
    return path


def add_results_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """`--results [NAME]`: also write docs/results/NAME.json (NAME defaults to `default`)."""
    parser.add_argument("--results", nargs="?", const=default, default=None, metavar="NAME",
                        help=f"also write the table to docs/results/NAME.json for the docs (default name: {default})")
