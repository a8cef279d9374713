"""`CalibrationOptions`: everything that decides an INT8 artifact (and the calibration cache key)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from neoxrt.errors import CalibrationError

METHODS = ("minmax", "percentile", "entropy", "ort-dynamic")
INT4_METHODS = ("gptq", "awq", "rtn", "ort-nbits")
BITS = (8, 4)
INT4_BLOCKS = (16, 32, 64, 128, 256)
LM_HEADS = ("int8", "int4", "float")
WEIGHT_RANGES = ("reduced", "full")
DEFAULT_SAMPLES = 64
INT4_TOKEN_VALUES = 1 << 24  # calibration tokens x hidden size at most, for the INT4 default (see int4_samples)


def int4_samples(options: CalibrationOptions, hidden_size: int) -> int:
    """The INT4 calibration windows: `options.samples`, or by default 64 capped so that tokens x hidden stays under
    2^24 (at least 8): 64 windows up to the 2048-wide Pythia-1.4b, 21 for NeoX-20B's 6144."""
    if options.samples is not None:
        return options.samples
    return max(8, min(DEFAULT_SAMPLES, INT4_TOKEN_VALUES // (hidden_size * options.seq_len)))


@dataclass(frozen=True)
class CalibrationOptions:
    """Args:
        samples: calibration windows drawn (seeded) from the data; None: 64, or with bits 4 fewer for wide models
            (`int4_samples`: the GPTQ statistics pass costs 2 x parameters x tokens, so NeoX-20B's width reads 21
            windows and stays a small multiple of round-to-nearest's time).
        seq_len: tokens per window (prompt steps, past 0).
        method: activation range selection: minmax, percentile, entropy (KL, as TensorRT's entropy calibrator);
            ort-dynamic is the onnxruntime.quantization.quantize_dynamic baseline (ONNX Runtime only, no data).
            With bits 4: gptq (GPTQ rounding against the calibration activations, the default), awq (AWQ's
            activation-aware factors, then GPTQ rounding through them), rtn (round to nearest, no data) or
            ort-nbits (onnxruntime's MatMulNBitsQuantizer, the baseline). None takes the default for `bits`.
        percentile: for method percentile, the share of |x| kept inside the range.
        smoothquant: SmoothQuant migration strength alpha in (0, 1], or None for off.
        weights_only: int8 weights (per output channel), fp32 activations.
        weight_range: W8A8 weights in [-63, 63] (reduced, the default) or [-127, 127] (full). ONNX Runtime's x86
            integer GEMM without VNNI (AVX2, AVX-512F) adds pairs of u8 x s8 products in int16, which saturates
            with full-range weights (255 x 127 x 2 > 32767): measured on an AVX2 machine, the planted-outlier
            test's mean KL went from 0.0036 (full) to under a third of it with SmoothQuant only once the weights
            were reduced. Full range suits TensorRT and VNNI CPUs; weights-only artifacts always use it.
        bits: weight bits: 8, or 4 (weights only, per-block scales: calibration/int4.py).
        block_size: INT4 block along K (a power of two from 16 to 256; it must divide every weight's K).
        accuracy_level: ONNX Runtime MatMulNBits accuracy_level for INT4 (4: int8 products, 0: float).
        lm_head: the LM head's weights with bits 4: int8 (8-bit blocks), int4, or float (the source's type).
        seed: window sampling seed.
        batch: windows per ONNX Runtime call while collecting statistics.
    """

    samples: int | None = None
    seq_len: int = 128
    method: str | None = None
    percentile: float = 99.99
    smoothquant: float | None = 0.5
    weights_only: bool = False
    weight_range: str = "reduced"
    bits: int = 8
    block_size: int = 32
    accuracy_level: int = 4
    lm_head: str = "int8"
    seed: int = 0
    batch: int = 4

    def __post_init__(self):
        if self.bits not in BITS:
            raise CalibrationError(f"--bits must be 4 or 8, got {self.bits}")
        if self.bits == 4 and not self.weights_only:
            raise CalibrationError("--bits 4 needs --weights-only (INT4 weights with float activations; no INT4 "
                                   "activations)")
        if self.method is None:
            object.__setattr__(self, "method", "gptq" if self.bits == 4 else "percentile")
        methods = INT4_METHODS if self.bits == 4 else METHODS
        if self.method not in methods:
            raise CalibrationError(f"--method with --bits {self.bits} must be one of {', '.join(methods)}, "
                                   f"got {self.method!r}")
        if self.block_size not in INT4_BLOCKS:
            raise CalibrationError(f"--block-size must be one of {', '.join(map(str, INT4_BLOCKS))}, got {self.block_size}")
        if self.lm_head not in LM_HEADS:
            raise CalibrationError(f"--lm-head must be one of {', '.join(LM_HEADS)}, got {self.lm_head!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise CalibrationError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.samples is None and self.bits == 8:
            object.__setattr__(self, "samples", DEFAULT_SAMPLES)
        if self.samples is not None and self.samples < 1:
            raise CalibrationError(f"--samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise CalibrationError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not 50.0 < self.percentile <= 100.0:
            raise CalibrationError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.smoothquant is not None and not 0.0 < self.smoothquant <= 1.0:
            raise CalibrationError(f"--smoothquant alpha must be in (0, 1] (or off), got {self.smoothquant}")
        if self.weight_range not in WEIGHT_RANGES:
            raise CalibrationError(f"--weight-range must be one of {', '.join(WEIGHT_RANGES)}, got {self.weight_range!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise CalibrationError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.batch < 1:
            raise CalibrationError(f"batch must be at least 1, got {self.batch}")

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.bits == 8:  # the INT4 fields mean nothing for INT8 (and keep INT8 cache keys as they were)
            for name in ("block_size", "accuracy_level", "lm_head"):
                del out[name]
        return out
