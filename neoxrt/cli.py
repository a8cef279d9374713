"""The `neoxrt` command line. Every `NeoxrtError` becomes one line on stderr and exit code 2.

Each stage keeps its subcommands in its own `cli.py` (COMMANDS, ADDERS); this module only maps a command to
its stage and imports that stage alone, so `neoxrt serve` never imports onnx or torch and `neoxrt generate`
never imports the exporter. Shared argument types and --json output: `neoxrt/cli_types.py`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from neoxrt import __version__
from neoxrt.cli_types import OneLineParser, parse_args
from neoxrt.errors import NeoxrtError

EXIT_USAGE = 2
# in --help order; `neoxrt bench` has its own parser (neoxrt.bench.run)
STAGES = ("neoxrt.model.cli", "neoxrt.export.cli", "neoxrt.calibration.cli", "neoxrt.runtime.cli", "neoxrt.report.cli",
          "neoxrt.serve.cli")
COMMAND_STAGE = {"inspect": "neoxrt.model.cli", "export": "neoxrt.export.cli", "build": "neoxrt.export.cli",
                 "verify": "neoxrt.export.cli", "calibrate": "neoxrt.calibration.cli", "generate": "neoxrt.runtime.cli",
                 "classify": "neoxrt.runtime.cli", "answer": "neoxrt.runtime.cli", "compare": "neoxrt.report.cli",
                 "serve": "neoxrt.serve.cli", "triton-repo": "neoxrt.serve.cli"}


def _add_bench(sub) -> None:
    # listed for --help; main hands `neoxrt bench ...` to neoxrt.bench.run, which parses its own options
    sub.add_parser("bench", help="speed against transformers and Optimum (see make bench; --quick, --threads)")


def _subcommands(command: str | None = None) -> list:
    """The adders of `command`'s stage alone, or of every stage (and bench) for --help or an unknown command."""
    if command in COMMAND_STAGE:
        return list(importlib.import_module(COMMAND_STAGE[command]).ADDERS)
    adders = [add for stage in STAGES for add in importlib.import_module(stage).ADDERS]
    return adders + [_add_bench]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="neoxrt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"neoxrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _subcommands(command):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own argument parser (neoxrt.bench.run)
        from neoxrt.bench.run import main as bench

        return bench(argv[1:])
    parser = build_parser(argv[0] if argv else None)
    args = parse_args(parser, argv)
    if isinstance(args, int):  # a usage error (one line, exit 2) or --help / --version
        return args
    try:
        return args.func(args)
    except NeoxrtError as exc:
        print(f"neoxrt {args.command}: error: {exc}".replace("\n", " "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"neoxrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
