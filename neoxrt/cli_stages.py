"""Subcommands of the later stages (export, generate, compare, ...), kept apart from the CLI core."""

from __future__ import annotations

import argparse


def _cmd_export(args: argparse.Namespace) -> int:
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import TWO_GB, ExportOptions

    options = ExportOptions(
        dtype=args.dtype,
        attention=args.attention,
        opset=args.opset,
        external_data_threshold=TWO_GB if args.external_data_threshold is None else args.external_data_threshold,
    )
    export_checkpoint(args.checkpoint, args.out_dir, options, force=args.force)
    return 0


def _add_export(sub) -> None:
    from neoxrt.export.options import ATTENTIONS, DTYPES

    p = sub.add_parser("export", help="export a checkpoint to an ONNX artifact folder")
    p.add_argument("checkpoint", help="checkpoint folder (Hugging Face format) or hub id")
    p.add_argument("out_dir", help="artifact folder to write (atomically)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--attention", default="decomposed", choices=ATTENTIONS)
    p.add_argument("--opset", type=int, default=None, help="ai.onnx opset (default: the flavour's lowest)")
    p.add_argument("--external-data-threshold", type=int, default=None, metavar="BYTES",
                   help="weights past this many bytes go to model.onnx.data (default 2 GB)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=_cmd_export)


ADDERS: list = [_add_export]
