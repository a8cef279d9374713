"""`neoxrt inspect`: a checkpoint's parsed config and parameter count."""

from __future__ import annotations

import argparse


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


COMMANDS = ("inspect",)
ADDERS: list = [_add_inspect]
