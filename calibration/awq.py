"""Activation-aware INT4 (AWQ, Lin et al., 2024): protect the weights of the input channels that carry large
activations by scaling them up before quantization and the activations down by the same factor.

For a LayerNorm output X [.., K] feeding W_1..W_m [K, N_i]: s = mean|X_k|^alpha (normalised to geometric
mean 1); LayerNorm's scale and bias are divided by s and each W's rows multiplied by s before its 4-bit
block quantization, so X W is unchanged in exact arithmetic while the salient channels' weights get more of
each block's 16 levels. alpha is searched on a grid, per group, minimising the output error
sum_i ||X (Q(W_i s) / s - W_i)||^2 = sum_i tr(D_i^T G D_i) with G = X^T X (accumulated over every calibration
token, K x K), each candidate quantized with its block scales clip-searched (int4.clip_search, against the
diagonal of G) as the artifact will be. (Searching with plain max|w| / 7 scales, as AWQ's reference code
does, is 6x faster here but picks worse factors: on the default model KL 1.20e-3 against 9.5e-4, top-1
0.977 against 0.985.)

MatMuls whose input has no foldable producer (attention output, GELU output) get the clip search only.

Memory bound: per activation, K floats of sums, plus G (K x K) for the LayerNorm-fed ones, gathered one
layer at a time (layered.py) and dropped once that layer's groups are searched; during the search, one
column slice of one weight at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neoxrt.calibration.int4 import clip_search, column_slices, dequantize_blocks, quantize_blocks

ALPHAS = np.linspace(0.0, 1.0, 11)


@dataclass
class ActivationStats:
    """Sums over calibration tokens of one activation: |x|, x^2 per channel, and X^T X when asked."""

    tokens: int = 0
    abs_sum: np.ndarray | None = None
    sq_sum: np.ndarray | None = None
    gram: np.ndarray | None = None
    want_gram: bool = False

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        if self.abs_sum is None:
            k = x.shape[1]
            self.abs_sum, self.sq_sum = np.zeros(k, np.float64), np.zeros(k, np.float64)
            self.gram = np.zeros((k, k), np.float64) if self.want_gram else None
        self.tokens += x.shape[0]
        self.abs_sum += np.abs(x).sum(axis=0)
        self.sq_sum += np.square(x, dtype=np.float64).sum(axis=0)
        if self.gram is not None:
            self.gram += x.T.astype(np.float64) @ x

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def mean_sq(self) -> np.ndarray:
        return (self.sq_sum / max(self.tokens, 1)).astype(np.float32)


@dataclass
class GroupChoice:
    alpha: float
    error: float
    error_alpha0: float  # the same objective with s = 1 (clip search only)
    factors: np.ndarray = field(repr=False)


def scale_factors(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s_k = mean|X_k|^alpha / geometric mean, floored so that dead channels do not blow up."""
    s = np.maximum(mean_abs, 1e-8) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def quantized(w: np.ndarray, block: int, mean_sq: np.ndarray | None, s: np.ndarray | None = None) -> np.ndarray:
    """Q(W s) / s as fp32 (clip-searched block scales); s None = 1."""
    ws = w if s is None else w * s[:, None]
    h = None if mean_sq is None else (mean_sq if s is None else mean_sq / np.square(s))
    scales = clip_search(ws, block, h)
    deq = dequantize_blocks(quantize_blocks(ws, scales), scales)
    return deq if s is None else deq / s[:, None]


def search_group(weights: list, st: ActivationStats, block: int) -> GroupChoice:
    """The alpha (and factors) with the least output error over the weights fed by one activation; each weight
    read in column slices (int4.column_slices: the error is a sum over output columns)."""
    gram = st.gram.astype(np.float32)
    best = None
    err0 = None
    for alpha in ALPHAS:
        s = scale_factors(st.mean_abs, alpha)
        err = 0.0
        for weight in weights:
            for _, w in column_slices(weight):
                d = quantized(w, block, st.mean_sq, s) - w
                err += float(np.einsum("kn,kn->", gram @ d, d))
        if alpha == 0.0:
            err0 = err
        if best is None or err < best.error:
            best = GroupChoice(float(alpha), err, 0.0, s)
    best.error_alpha0 = err0
    return best
