"""The `neoxrt` command line. Every `NeoxrtError` becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys

from neoxrt import __version__
from neoxrt.cli_types import OneLineParser, parse_args
from neoxrt.errors import NeoxrtError

EXIT_USAGE = 2


def _cmd_inspect(args: argparse.Namespace) -> int:
    from neoxrt.model import load_model

    model = load_model(args.checkpoint)
    print(model.config.to_json())
    print(f"parameters: {model.num_parameters()}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's parsed config and exact parameter count")
    p.add_argument("checkpoint", help="checkpoint folder (Hugging Face format) or hub id")
    p.set_defaults(func=_cmd_inspect)


def _subcommands(command: str | None = None):
    """(adder) for every subcommand; stages add theirs here. The serving commands alone when `command` is
    one of them: their parsers import no other stage (no onnx, no torch)."""
    from neoxrt.serve import cli as serve_cli

    if command in serve_cli.COMMANDS:
        return serve_cli.ADDERS
    from neoxrt import cli_stages

    return [_add_inspect, *cli_stages.ADDERS, *serve_cli.ADDERS]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="neoxrt", description=__doc__)
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


def print_json(obj) -> None:
    print(json.dumps(obj, indent=None, separators=(",", ":")))


if __name__ == "__main__":
    sys.exit(main())
