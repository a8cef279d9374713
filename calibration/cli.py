"""`neoxrt calibrate`: INT8 (SmoothQuant W8A8, weights-only) and INT4 weights-only artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from neoxrt import cli_types as t


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
    p.add_argument("--samples", type=t.positive_int, default=None,
                   help="windows to draw (default 64; INT4: 64, fewer for models wider than 2048: 21 at NeoX-20B's width)")
    p.add_argument("--seq-len", type=t.positive_int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    p.add_argument("--method", default=None, metavar="METHOD",
                   help=f"INT8 activation ranges: {', '.join(METHODS)} (default percentile; ort-dynamic = onnxruntime "
                        f"quantize_dynamic baseline, no data); INT4: {', '.join(INT4_METHODS)} (default gptq; awq = AWQ "
                        "factors, then gptq; rtn = round to nearest, no data; ort-nbits = onnxruntime "
                        "MatMulNBitsQuantizer baseline)")
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


COMMANDS = ("calibrate",)
ADDERS: list = [_add_calibrate]
