"""`neoxrt classify` and `neoxrt answer`: the head artifacts from the command line (torch-free)."""

from __future__ import annotations

import argparse

from neoxrt import cli_types as t
from neoxrt import contract as io


def _load(args: argparse.Namespace):
    from neoxrt.runtime.classifier import Classifier

    return Classifier.from_artifacts(args.artifact_dir, threads=args.threads, batch_size=args.batch_size)


def _cmd_classify(args: argparse.Namespace) -> int:
    from neoxrt.cli import print_json
    from neoxrt.errors import RuntimeShapeError

    if not args.text:
        raise RuntimeShapeError("give --text TEXT (repeat for a batch)")
    classifier = _load(args)
    if classifier.task == io.TOKEN_CLASSIFICATION:
        tagged = classifier.tag(args.text)
        if args.json:
            print_json([[t.to_dict() for t in row] for row in tagged])
        for i, row in enumerate([] if args.json else tagged):
            print(f"[{i}] " + " ".join(f"{t.token}/{t.label}" for t in row))
        return 0
    results = classifier.classify(args.text)  # refuses other heads in one line
    if args.json:
        print_json([{"label": r.label, "score": r.score, "scores": r.scores} for r in results])
    for i, r in enumerate([] if args.json else results):
        print(f"[{i}] {r.label} {r.score:.4f}")
    return 0


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a text- or token-classification artifact (neoxrt export --task)")
    p.add_argument("artifact_dir")
    p.add_argument("--text", action="append", help="text to classify (repeat for a batch)")
    _common(p, '[{"label", "score", "scores": {label: probability}}] per text; token classification: '
               'per text [{"token", "start", "end", "label", "score"}]')
    p.set_defaults(func=_cmd_classify)


def _cmd_answer(args: argparse.Namespace) -> int:
    from neoxrt.cli import print_json

    result = _load(args).answer(args.question, args.context, max_answer_len=args.max_answer_len, stride=args.stride)
    if args.json:
        print_json(result.to_dict())
    else:
        print(f"{result.answer} [{result.start}:{result.end}] {result.score:.4f}")
    return 0


def add_answer(sub) -> None:
    p = sub.add_parser("answer", help="extract an answer span from a context with a question-answering artifact")
    p.add_argument("artifact_dir")
    p.add_argument("--question", required=True)
    p.add_argument("--context", required=True)
    p.add_argument("--max-answer-len", type=t.positive_int, default=15, help="longest answer in tokens (default 15)")
    p.add_argument("--stride", type=t.count, default=None,
                   help="context tokens shared by neighbouring windows of a long context (default min(128, half a window))")
    _common(p, '{"answer", "start", "end", "score"} (character offsets into the context)')
    p.set_defaults(func=_cmd_answer)


def _common(p: argparse.ArgumentParser, json_help: str) -> None:
    p.add_argument("--batch-size", type=t.positive_int, default=8, help="rows per ONNX Runtime run (default 8)")
    p.add_argument("--threads", type=t.positive_int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help=json_help)


ADDERS = [add_classify, add_answer]
