"""`CalibrationOptions`: everything that decides an INT8 artifact (and the calibration cache key)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from neoxrt.errors import CalibrationError

METHODS = ("minmax", "percentile", "entropy", "ort-dynamic")
WEIGHT_RANGES = ("reduced", "full")


@dataclass(frozen=True)
class CalibrationOptions:
    """Args:
        samples: calibration windows drawn (seeded) from the data.
        seq_len: tokens per window (prompt steps, past 0).
        method: activation range selection: minmax, percentile, entropy (KL, as TensorRT's entropy calibrator);
            ort-dynamic is the onnxruntime.quantization.quantize_dynamic baseline (ONNX Runtime only, no data).
        percentile: for method percentile, the share of |x| kept inside the range.
        smoothquant: SmoothQuant migration strength alpha in (0, 1], or None for off.
        weights_only: int8 weights (per output channel), fp32 activations.
        weight_range: W8A8 weights in [-63, 63] (reduced, the default) or [-127, 127] (full). ONNX Runtime's x86
            integer GEMM without VNNI (AVX2, AVX-512F) adds pairs of u8 x s8 products in int16, which saturates
            with full-range weights (255 x 127 x 2 > 32767): measured on an AVX2 machine, the planted-outlier
            test's mean KL went from 0.0036 (full) to under a third of it with SmoothQuant only once the weights
            were reduced. Full range suits TensorRT and VNNI CPUs; weights-only artifacts always use it.
        seed: window sampling seed.
        batch: windows per ONNX Runtime call while collecting statistics.
    """

    samples: int = 64
    seq_len: int = 128
    method: str = "percentile"
    percentile: float = 99.99
    smoothquant: float | None = 0.5
    weights_only: bool = False
    weight_range: str = "reduced"
    seed: int = 0
    batch: int = 4

    def __post_init__(self):
        if self.method not in METHODS:
            raise CalibrationError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.samples < 1:
            raise CalibrationError(f"--samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise CalibrationError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not 50.0 < self.percentile <= 100.0:
            raise CalibrationError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.smoothquant is not None and not 0.0 < self.smoothquant <= 1.0:
            raise CalibrationError(f"--smoothquant alpha must be in (0, 1] (or off), got {self.smoothquant}")
        if self.weight_range not in WEIGHT_RANGES:
            raise CalibrationError(f"--weight-range must be one of {', '.join(WEIGHT_RANGES)}, got {self.weight_range!r}")
        if self.batch < 1:
            raise CalibrationError(f"batch must be at least 1, got {self.batch}")

    def to_dict(self) -> dict:
        return asdict(self)
