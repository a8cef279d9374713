"""`neoxrt generate`, `neoxrt classify` and `neoxrt answer`: the runtime from the command line (torch-free)."""

from __future__ import annotations

import argparse

from neoxrt import cli_types as t
from neoxrt import contract as io


def _load(args: argparse.Namespace):
    from neoxrt.runtime.classifier import Classifier

    return Classifier.from_artifacts(args.artifact_dir, threads=args.threads, batch_size=args.batch_size)


def _cmd_classify(args: argparse.Namespace) -> int:
    from neoxrt.cli_types import print_json
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
    from neoxrt.cli_types import print_json

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


def _cmd_generate(args: argparse.Namespace) -> int:
    import sys

    from neoxrt.cli_types import print_json
    from neoxrt.errors import RuntimeShapeError
    from neoxrt.runtime import Generator

    prompts = list(args.prompt or []) + list(args.input_ids or [])
    if not prompts:
        raise RuntimeShapeError("give --prompt TEXT or --input-ids 1,2,3")
    kwargs = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, top_p=args.top_p,
                  **({"temperature": args.temperature} if args.temperature is not None else {}),
                  repetition_penalty=args.repetition_penalty, seed=args.seed, stop_token_ids=tuple(args.stop_token_ids or ()),
                  stop_strings=tuple(args.stop or ()), prompt_lookup_tokens=args.prompt_lookup_tokens,
                  min_new_tokens=args.min_new_tokens, no_repeat_ngram_size=args.no_repeat_ngram_size,
                  typical_p=args.typical_p, bad_words_ids=tuple(args.bad_words_ids or ()), logprobs=args.logprobs,
                  **({"do_sample": True} if args.do_sample else {}),
                  **({"num_beams": args.num_beams, "length_penalty": args.length_penalty,
                      "early_stopping": {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)}
                     if args.num_beams != 1 else {}),
                  **({"num_return_sequences": args.num_return_sequences} if args.num_return_sequences != 1 else {}),
                  **({"num_draft_tokens": args.num_draft_tokens} if args.num_draft_tokens else {}))
    constraint = _structured(args)
    generator = Generator.from_artifacts(args.artifact_dir, backend=args.backend, threads=args.threads, draft=args.draft)
    if constraint is not None:
        kwargs["structured_outputs"] = _compiled(generator, *constraint)
    if args.json:
        result = generator.generate(prompts, **kwargs)
        print_json({"ids": result.ids, "text": result.text, "finish_reasons": result.finish_reasons,
                    **({"logprobs": result.logprobs} if result.logprobs is not None else {})})
        return 0
    if len(prompts) == 1 and args.num_beams == 1 and args.num_return_sequences == 1:  # stream to the terminal
        for event in generator.stream(prompts, **kwargs):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = generator.generate(prompts, **kwargs)
    for row, ids in enumerate(result.ids):
        print(f"[{row}] " + (result.text[row] if result.text is not None else ",".join(map(str, ids))))
    return 0


# the flags that constrain the output, and the structured_outputs kind each sets (one of them at most)
_FORMAT_FLAGS = {"json_schema": ("--json-schema", "json"), "regex": ("--regex", "regex"), "choice": ("--choice", "choice"),
                 "grammar": ("--grammar", "grammar"), "json_object": ("--json-object", "json_object")}


def _structured(args: argparse.Namespace) -> tuple[str, dict] | None:
    """(flag, structured_outputs) from the format flags, or None; a schema or grammar is read from its file.

    Raises:
        GrammarError: a file that cannot be read.
    """
    from pathlib import Path

    from neoxrt.errors import GrammarError

    for dest, (flag, kind) in _FORMAT_FLAGS.items():
        value = getattr(args, dest)
        if value in (None, False):
            continue
        if dest in ("json_schema", "grammar"):
            try:
                value = Path(value).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise GrammarError(f"{flag}: expected a readable UTF-8 file, got {value} ({exc.strerror or exc})") from None
        return flag, {kind: value}
    return None


def _compiled(generator, flag: str, value: dict):
    """The constraint checked and compiled before generating; the engine's reason names the flag."""
    from neoxrt.errors import GrammarError
    from neoxrt.runtime.structured import StructuredOutputs

    try:
        spec = StructuredOutputs.parse(value)
        generator.grammars.constraint(spec)  # compiled once here (cached), so a bad one stops before the model runs
    except GrammarError as exc:
        raise GrammarError(str(exc).replace(f"structured_outputs.{next(iter(value))}", flag, 1)) from None
    return spec


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from an artifact folder (ONNX Runtime or TensorRT)")
    p.add_argument("artifact_dir")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--input-ids", action="append", type=t.token_ids, help="prompt as token ids 1,2,3 (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=t.positive_int, default=32)
    p.add_argument("--temperature", type=t.nonnegative_float, default=None, help="0 = greedy (the default without --do-sample)")
    p.add_argument("--top-k", type=t.count, default=0)
    p.add_argument("--top-p", type=t.fraction, default=1.0)
    p.add_argument("--repetition-penalty", type=t.positive_float, default=1.0)
    p.add_argument("--seed", type=t.seed, default=None)
    p.add_argument("--stop-token-ids", type=t.token_ids, default=None, help="extra stop ids 1,2 (EOS always stops)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--threads", type=t.positive_int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"),
                   help="auto: TensorRT for engine artifacts (neoxrt build), ONNX Runtime otherwise")
    p.add_argument("--do-sample", action="store_true", help="sample (temperature 1 unless given), as transformers")
    p.add_argument("--min-new-tokens", type=t.count, default=0, help="no EOS or stop id before this many new tokens")
    p.add_argument("--no-repeat-ngram-size", type=t.count, default=0, help="never repeat an n-gram of this size")
    p.add_argument("--typical-p", type=t.fraction, default=1.0, help="locally typical sampling mass")
    p.add_argument("--bad-words-ids", type=t.token_ids, action="append", metavar="1,2",
                   help="a token sequence never to produce (repeatable)")
    p.add_argument("--logprobs", type=t.count, default=None, metavar="N",
                   help="with --json: each token's log-probability and the N most likely alternatives")
    p.add_argument("--num-beams", type=t.positive_int, default=1, help="beam search with this many beams (as transformers)")
    p.add_argument("--length-penalty", type=t.finite_float, default=1.0, help="beam search: score = sum log p / length**this")
    p.add_argument("--early-stopping", default="false", choices=("true", "false", "never"),
                   help="beam search: transformers' early_stopping")
    p.add_argument("--num-return-sequences", type=t.positive_int, default=1,
                   help="sequences per prompt (beams, or samples when sampling)")
    p.add_argument("--draft", default=None, metavar="DRAFT_DIR",
                   help="speculative decoding: an artifact with the same tokenizer (e.g. this model's --weights-only INT8) "
                        "guesses tokens, this model checks them in one step (same tokens as without it)")
    p.add_argument("--num-draft-tokens", type=t.positive_int, default=None, metavar="K",
                   help="with --draft: the most tokens guessed per step (default 8, adapts to the acceptance)")
    p.add_argument("--prompt-lookup-tokens", type=t.count, default=0, metavar="N",
                   help="speculative decoding without a draft: guess up to N tokens from an n-gram match in the text so far")
    p.add_argument("--json", action="store_true", help='print {"ids": [[...]], "text": [...]} (prompt excluded)')
    fmt = p.add_argument_group("structured outputs (one of)").add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under this JSON schema (compact)")
    fmt.add_argument("--regex", metavar="R", help="the output matches this regular expression")
    fmt.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these (repeat per choice)")
    fmt.add_argument("--grammar", metavar="FILE", help="the output is in this grammar (GBNF/EBNF or Lark)")
    fmt.add_argument("--json-object", action="store_true", help="the output is a JSON object (compact)")
    p.set_defaults(func=_cmd_generate)


COMMANDS = ("generate", "classify", "answer")
ADDERS: list = [_add_generate, add_classify, add_answer]
