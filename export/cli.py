"""`neoxrt export`, `neoxrt build` (TensorRT) and `neoxrt verify`: the export stage's subcommands."""

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
        lm_head=args.lm_head,
    )
    export_checkpoint(args.checkpoint, args.out_dir, options, force=args.force)
    return 0


def _add_export(sub) -> None:
    from neoxrt.contract import TASKS
    from neoxrt.export.options import ATTENTIONS, DTYPES, KV_CACHES, LM_HEADS, LOGITS

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
    p.add_argument("--kv-cache", default=None, choices=KV_CACHES,
                   help="static (the default where it applies: the causal LM, fused attention, opset 24): fixed slots "
                        "updated in place, no per-step cache copy, the serving KV-cache pool; or dynamic (optimum's "
                        "contract; the default for other flavours and heads)")
    p.add_argument("--lm-head", default="exact", choices=LM_HEADS,
                   help="exact (default) or screened: an INT8 copy of the LM head bounds the logits, the tokens that "
                        "can be the largest are recomputed in fp32 (greedy tokens = fp32's; fp32 only)")
    p.add_argument("--external-data-threshold", type=t.count, default=None, metavar="BYTES",
                   help="weights past this many bytes go to model.onnx.data, streamed tensor by tensor (default 256 MiB, "
                        "at most 2 GB)")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="the head to export (optimum's task names; default: the one config.json architectures names)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=_cmd_export)


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


COMMANDS = ("export", "build", "verify")
ADDERS: list = [_add_export, _add_build, _add_verify]
