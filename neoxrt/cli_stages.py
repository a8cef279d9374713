"""Subcommands of the later stages (export, generate, compare, ...), kept apart from the CLI core."""

from __future__ import annotations

import argparse
from pathlib import Path

from neoxrt import cli_types as t


def _cmd_export(args: argparse.Namespace) -> int:
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import INLINE_LIMIT, ExportOptions

    options = ExportOptions(
        dtype=args.dtype,
        attention=args.attention,
        opset=args.opset,
        external_data_threshold=INLINE_LIMIT if args.external_data_threshold is None else args.external_data_threshold,
        logits=args.logits,
        kv_cache=args.kv_cache,
        task=args.task,
    )
    export_checkpoint(args.checkpoint, args.out_dir, options, force=args.force)
    return 0


def _add_export(sub) -> None:
    from neoxrt.contract import TASKS
    from neoxrt.export.options import ATTENTIONS, DTYPES, KV_CACHES, LOGITS

    p = sub.add_parser("export", help="export a checkpoint to an ONNX artifact folder")
    p.add_argument("checkpoint", help="checkpoint folder (Hugging Face format) or hub id")
    p.add_argument("out_dir", help="artifact folder to write (atomically)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--attention", default="fused", choices=ATTENTIONS,
                   help="fused (default, ONNX Attention-23 + RotaryEmbedding-23), decomposed (opset 17+, what optimum "
                        "loads), plugin (TensorRT plugin node)")
    p.add_argument("--opset", type=t.positive_int, default=None, help="ai.onnx opset (default: the flavour's lowest)")
    p.add_argument("--logits", default="all", choices=LOGITS,
                   help="all (optimum's contract, default) or last: [B, 1, V], faster prompts for generation")
    p.add_argument("--kv-cache", default="dynamic", choices=KV_CACHES,
                   help="dynamic (optimum's contract, default) or static: fixed slots updated in place, no per-step "
                        "cache copy (fused attention, opset 24)")
    p.add_argument("--external-data-threshold", type=t.count, default=None, metavar="BYTES",
                   help="weights past this many bytes go to model.onnx.data, streamed tensor by tensor (default 256 MiB, "
                        "at most 2 GB)")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="the head to export (optimum's task names; default: the one config.json architectures names)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=_cmd_export)


def _cmd_generate(args: argparse.Namespace) -> int:
    import sys

    from neoxrt.cli import print_json
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
    generator = Generator.from_artifacts(args.artifact_dir, backend=args.backend, threads=args.threads, draft=args.draft)
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
                   help="with --draft: the most tokens guessed per step (default 4, adapts to the acceptance)")
    p.add_argument("--prompt-lookup-tokens", type=t.count, default=0, metavar="N",
                   help="speculative decoding without a draft: guess up to N tokens from an n-gram match in the text so far")
    p.add_argument("--json", action="store_true", help='print {"ids": [[...]], "text": [...]} (prompt excluded)')
    p.set_defaults(func=_cmd_generate)


def _cmd_compare(args: argparse.Namespace) -> int:
    from neoxrt.cli import print_json
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


def _alpha(text: str) -> float | None:
    if text.lower() in ("off", "none", "0"):
        return None
    try:
        return t.fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an alpha in (0, 1] or 'off', got {text!r}") from None


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from neoxrt.calibration.calibrate import calibrate_artifact
    from neoxrt.calibration.options import CalibrationOptions

    options = CalibrationOptions(samples=args.samples, seq_len=args.seq_len, method=args.method,
                                 percentile=args.percentile, smoothquant=None if args.weights_only else args.smoothquant,
                                 weights_only=args.weights_only, weight_range=args.weight_range, seed=args.seed,
                                 bits=args.bits, block_size=args.block_size, accuracy_level=args.accuracy_level,
                                 lm_head=args.lm_head)
    calibrate_artifact(args.artifact_dir, args.out_dir, options, data=args.data, force=args.force, cache=args.cache,
                       recalibrate=args.recalibrate, threads=args.threads)
    return 0


def _add_calibrate(sub) -> None:
    from neoxrt.calibration.options import INT4_METHODS, LM_HEADS, METHODS, CalibrationOptions

    d = CalibrationOptions()
    p = sub.add_parser("calibrate", help="INT8: calibrate an fp32 export into a Q/DQ artifact (ONNX Runtime and "
                                         "TensorRT); --weights-only --bits 4: INT4 weights (MatMulNBits)")
    p.add_argument("artifact_dir", help="artifact folder written by neoxrt export (fp32; fp16 too for --bits 4)")
    p.add_argument("out_dir", help="INT8 / INT4 artifact folder to write (atomically)")
    p.add_argument("--data", nargs="+", type=Path, metavar="FILE",
                   help="calibration text file(s) (default: the embedded calibration slice, disjoint from the eval slice)")
    p.add_argument("--samples", type=t.positive_int, default=d.samples, help=f"windows to draw (default {d.samples})")
    p.add_argument("--seq-len", type=t.positive_int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    p.add_argument("--method", default=None, metavar="METHOD",
                   help=f"INT8 activation ranges: {', '.join(METHODS)} (default percentile; ort-dynamic = onnxruntime "
                        f"quantize_dynamic baseline, no data); INT4: {', '.join(INT4_METHODS)} (default awq; rtn = round "
                        "to nearest, no data; ort-nbits = onnxruntime MatMulNBitsQuantizer baseline)")
    p.add_argument("--percentile", type=t.finite_float, default=d.percentile,
                   help=f"for --method percentile (default {d.percentile})")
    p.add_argument("--smoothquant", type=_alpha, default=d.smoothquant, metavar="ALPHA",
                   help=f"SmoothQuant strength in (0, 1], or off (default {d.smoothquant})")
    p.add_argument("--weights-only", action="store_true", help="int8 weights, fp32 activations (lowest risk)")
    p.add_argument("--weight-range", default=d.weight_range, choices=("reduced", "full"),
                   help="W8A8 weights in [-63, 63] (reduced, default: exact on x86 CPUs without VNNI, where ONNX "
                        "Runtime's int16 pair sums saturate) or [-127, 127] (full: TensorRT, VNNI CPUs)")
    p.add_argument("--bits", type=t.positive_int, default=d.bits, help="weight bits with --weights-only: 8 (default) or 4")
    p.add_argument("--block-size", type=t.positive_int, default=d.block_size,
                   help="INT4 block along K: 32 (default), 64, 128 (16 and 256 too); must divide every weight's K")
    p.add_argument("--accuracy-level", type=t.count, default=d.accuracy_level,
                   help=f"INT4 MatMulNBits accuracy_level (default {d.accuracy_level}: int8 products on CPU)")
    p.add_argument("--lm-head", default=d.lm_head, choices=LM_HEADS,
                   help=f"INT4 artifacts: the LM head's weights (default {d.lm_head}: 8-bit blocks; int4; float = the source's)")
    p.add_argument("--seed", type=t.seed, default=d.seed, help="window sampling seed")
    p.add_argument("--cache", type=Path, help="calibration cache file (default: OUT_DIR/calibration_cache.npz if present)")
    p.add_argument("--recalibrate", action="store_true", help="ignore and replace an existing calibration cache")
    p.add_argument("--threads", type=t.positive_int, default=None, help="ONNX Runtime threads while collecting statistics")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_build(args: argparse.Namespace) -> int:
    from neoxrt.export.engine import BuildOptions, build_engine_artifact

    options = BuildOptions(max_batch=args.max_batch, max_context=args.max_context, opt_batch=args.opt_batch,
                           opt_prompt=args.opt_prompt, opt_past=args.opt_past, timing_cache=args.timing_cache,
                           workspace_gib=args.workspace, optimization_level=args.optimization_level,
                           hardware_compatibility=args.hardware_compatibility,
                           version_compatible=args.version_compatible, plugin=args.plugin,
                           verify_tokens=args.verify_tokens)
    build_engine_artifact(args.artifact_dir, args.out_dir, options, force=args.force)
    return 0


def _add_build(sub) -> None:
    from neoxrt.export.engine import HARDWARE_COMPATIBILITY, BuildOptions

    d = BuildOptions()  # model-independent defaults only: the model-dependent ones are derived in the build
    p = sub.add_parser("build", help="TensorRT engine from an export (FP16, dynamic or static KV cache, or a head), or "
                                      "an INT8 artifact (needs a GPU and TensorRT)")
    p.add_argument("artifact_dir", help="artifact written by neoxrt export or neoxrt calibrate")
    p.add_argument("out_dir", help="engine artifact folder to write (atomically)")
    p.add_argument("--max-batch", type=t.positive_int, default=d.max_batch)
    p.add_argument("--max-context", type=t.positive_int, default=None,
                   help="largest prompt + generated tokens (default: min(2048, the model's max_position_embeddings))")
    p.add_argument("--opt-batch", type=t.positive_int, default=None, help="batch TensorRT tunes for (default: --max-batch)")
    p.add_argument("--opt-prompt", type=t.positive_int, default=None, help="prompt length TensorRT tunes for (default 128)")
    p.add_argument("--opt-past", type=t.positive_int, default=None, help="cache length TensorRT tunes decode for (default: half)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file to reuse and update")
    p.add_argument("--workspace", type=t.positive_float, default=d.workspace_gib, metavar="GIB")
    p.add_argument("--optimization-level", type=t.count, default=d.optimization_level, help="builder level 0..5")
    p.add_argument("--hardware-compatibility", default="none", choices=HARDWARE_COMPATIBILITY)
    p.add_argument("--version-compatible", action="store_true")
    p.add_argument("--plugin", action="store_true", help="plugin-flavour export with neoxrt's Triton attention plugin")
    p.add_argument("--verify-tokens", type=t.count, default=0, metavar="K",
                   help="add a verify profile (K + 1 tokens after a past) for speculative decoding (neoxrt generate "
                        "--draft / --prompt-lookup-tokens up to K)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=_cmd_build)


def _add_bench(sub) -> None:
    # listed for --help; neoxrt.cli.main hands `neoxrt bench ...` to neoxrt.bench.run, which parses its own options
    sub.add_parser("bench", help="speed against transformers and Optimum (see make bench; --quick, --threads)")


def _cmd_verify(args: argparse.Namespace) -> int:
    import time

    from neoxrt.manifest import read_manifest

    start = time.perf_counter()
    manifest = read_manifest(Path(args.artifact), ("export", "calibrate", "build"), full=True)
    size = sum((Path(args.artifact) / name).stat().st_size for name in manifest["files"])
    print(f"{args.artifact}: {len(manifest['files'])} files, {size / 2**30:.2f} GiB, every sha256 matches its manifest "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-hash every file of an artifact against its manifest (loading checks only "
                                      "sizes and sampled digests of files past 256 MiB)")
    p.add_argument("artifact", help="artifact folder (export, calibrate or build)")
    p.set_defaults(func=_cmd_verify)


def _add_heads(sub) -> None:
    from neoxrt.runtime.cli import ADDERS as HEAD_ADDERS  # classify, answer

    for add in HEAD_ADDERS:
        add(sub)


ADDERS: list = [_add_export, _add_generate, _add_compare, _add_calibrate, _add_build, _add_bench, _add_verify, _add_heads]
