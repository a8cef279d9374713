"""`neoxrt compare`: the accuracy report of a graph against PyTorch or another artifact."""

from __future__ import annotations

import argparse

from neoxrt import cli_types as t


def _cmd_compare(args: argparse.Namespace) -> int:
    from neoxrt.cli_types import print_json
    from neoxrt.errors import NeoxrtError
    from neoxrt.report.compare import DEFAULT_PROMPTS, CompareOptions, run_compare
    from neoxrt.report.render import markdown, write_report

    prompts = list(DEFAULT_PROMPTS)
    if args.prompts:
        try:
            prompts = [line for line in open(args.prompts, encoding="utf-8").read().splitlines() if line.strip()]
        except OSError as exc:
            raise NeoxrtError(f"--prompts {args.prompts}: {exc.strerror}") from None
        if not prompts:
            raise NeoxrtError(f"--prompts {args.prompts}: no prompts (one per line expected)")
    options = CompareOptions(texts=args.text or [], prompts=prompts, max_new_tokens=args.max_new_tokens,
                             seq_len=args.seq_len, windows=args.windows, thresholds=args.threshold or [],
                             progress=not args.json)
    if (args.reference is None) == (args.against is None):
        raise NeoxrtError("give --reference CHECKPOINT (the PyTorch model) or --against ARTIFACT (another artifact), "
                          "one of the two")
    report = run_compare(args.artifact_dir, args.reference, options, against=args.against,
                         allow_modified=args.allow_modified)
    if args.report:
        write_report(report, args.report)
    if args.json:
        print_json(report)
    else:
        print(markdown(report))
    return 0 if report["passed"] else 1


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="prove a graph against the PyTorch reference or another artifact "
                                       "(exit 1 over threshold)")
    p.add_argument("artifact_dir", metavar="PATH", help="our artifact folder, a folder with model.onnx (e.g. Optimum's "
                                                       "export) or a .onnx file with optimum's tensor names")
    p.add_argument("--reference", help="the checkpoint the graph came from (PyTorch reference)")
    p.add_argument("--against", metavar="ARTIFACT", help="compare against another artifact instead (e.g. fp16 or INT8 "
                                                        "against fp32), when no checkpoint is at hand")
    p.add_argument("--allow-modified", action="store_true",
                   help="compare our artifact even if its files no longer match its manifest (the report lists them)")
    p.add_argument("--text", action="append", help="text file(s) for teacher-forced checks (default: embedded held-out slice)")
    p.add_argument("--prompts", help="file with one prompt per line for forward and free-running checks")
    p.add_argument("--max-new-tokens", type=t.positive_int, default=32)
    p.add_argument("--seq-len", type=t.positive_int, default=128, help="teacher-forced window length")
    p.add_argument("--windows", type=t.positive_int, default=16, help="number of teacher-forced windows")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE", help="override a default threshold")
    p.add_argument("--report", help="folder for report.md, report.json and PNG plots")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_compare)


COMMANDS = ("compare",)
ADDERS: list = [_add_compare]
