"""Argument types every subcommand shares, a parser whose errors are one line, and --json output.

Each type refuses what no option can mean -- NaN or infinite floats, zero or negative counts, a seed outside
[0, 2**63) -- with argparse's "argument --NAME: ..." prefix naming the option; ranges that depend on the model
or on other options stay with the stage's options dataclass. Imports only the standard library and the
contract, so any CLI file (one per stage) can use it.
"""

from __future__ import annotations

import argparse
import math
import sys

from neoxrt.contract import MAX_COUNT

SEED_LIMIT = 2**63  # numpy's default_rng and the manifests take any seed in [0, 2**63)


class OneLineParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line on stderr (no usage block), exit code 2.
    Subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}".replace("\n", " ") + "\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    """Any finite number (NaN and infinities refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _ranged(parse, ok, what: str, doc: str):
    """An argparse type: `parse(text)`, then `ok(value)` or 'expected WHAT, got TEXT'."""

    def convert(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return value

    convert.__doc__ = doc
    return convert


positive_int = _ranged(_int, lambda v: 1 <= v <= MAX_COUNT, "an integer in [1, 2**31)",
                      "An integer >= 1 (counts, sizes, lengths).")
count = _ranged(_int, lambda v: 0 <= v <= MAX_COUNT, "an integer in [0, 2**31)", "An integer >= 0 (0 = off / none).")
seed = _ranged(_int, lambda v: 0 <= v < SEED_LIMIT, "a seed in [0, 2**63)", "A random seed: an integer in [0, 2**63).")
port = _ranged(_int, lambda v: 1 <= v <= 65535, "a port in [1, 65535]", "A TCP port.")
positive_float = _ranged(finite_float, lambda v: v > 0, "a number > 0", "A finite number > 0.")
nonnegative_float = _ranged(finite_float, lambda v: v >= 0, "a number >= 0", "A finite number >= 0.")
fraction = _ranged(finite_float, lambda v: 0 < v <= 1, "a number in (0, 1]",
                   "A finite number in (0, 1] (top_p, typical_p, SmoothQuant's alpha).")


def token_ids(text: str) -> list[int]:
    """Comma-separated token ids 1,2,3 (each >= 0; the vocabulary bound is the model's)."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids >= 0 like 1,2,3, got {text!r}")
    return ids


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """`parser.parse_args(argv)`, or the exit code argparse chose (2 after its one-line error, 0 for --help)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        sys.stderr.flush()
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def print_json(obj) -> None:
    """One line of compact JSON on stdout (the subcommands' --json output)."""
    import json

    print(json.dumps(obj, indent=None, separators=(",", ":")))
