"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

For a LayerNorm output X [.., K] feeding W [K, N]: s_k = max|X_k|^a / max|W_k,:|^(1-a); the LayerNorm's
scale and bias are divided by s and W's rows multiplied by s, so X W is unchanged in exact arithmetic while
per-tensor INT8 of X/s loses far less to the few channels that dominate max|X|.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from neoxrt.calibration.targets import SmoothGroup


def smoothing_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_k = max|X_k|^alpha / max|W_k|^(1-alpha), 1 where either side is 0, clipped to [1e-4, 1e4]."""
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def group_factors(model: onnx.ModelProto, groups: list[SmoothGroup], channel_absmax: dict[str, np.ndarray],
                  alpha: float) -> dict[str, np.ndarray]:
    """{activation: s} for every group, from its activation's per-channel max |x| and its weights' rows."""
    inits = {t.name: t for t in model.graph.initializer}
    factors = {}
    for g in groups:
        w_absmax = np.max([np.abs(numpy_helper.to_array(inits[w])).max(axis=1) for w in g.weights], axis=0)  # [K]
        factors[g.activation] = smoothing_factors(channel_absmax[g.activation], w_absmax, alpha)
    return factors


def fold_factors(model: onnx.ModelProto, groups: list[SmoothGroup], factors: dict[str, np.ndarray]) -> None:
    """Divide each LayerNorm's scale and bias by s and multiply its weights' rows by s, in place."""
    inits = {t.name: t for t in model.graph.initializer}

    def scaled(name: str, by: np.ndarray) -> None:
        array = numpy_helper.to_array(inits[name]).astype(np.float32) * by
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    for g in groups:
        s = factors[g.activation]
        scaled(g.scale, 1.0 / s)
        scaled(g.bias, 1.0 / s)
        for name in g.weights:
            scaled(name, s[:, None])
