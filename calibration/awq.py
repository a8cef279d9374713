"""Activation-aware INT4 (AWQ, Lin et al., 2024): protect the weights of the input channels that carry large
activations by scaling them up before quantization and the activations down by the same factor.

For a LayerNorm output X [.., K] feeding W_1..W_m [K, N_i]: s = mean|X_k|^alpha (normalised to geometric
mean 1); LayerNorm's scale and bias are divided by s and each W's rows multiplied by s before its 4-bit
block quantization, so X W is unchanged in exact arithmetic while the salient channels' weights get more of
each block's 16 levels. alpha is searched on a grid, per group, minimising the output error
sum_i ||X (Q(W_i s) / s - W_i)||^2 = sum_i tr(D_i^T G D_i) with G = X^T X, each candidate rounded to nearest
with max|w| / 7 block scales (AWQ's reference code), on a sample of output columns (`search_group`). The
artifact's weights are then rounded by GPTQ (gptq.py) against G seen through the factors.

Also here: `ActivationStats`, the per-activation sums every activation-aware method reads (|x| and X^T X:
whole up to `GRAM_WHOLE` channels, its diagonal blocks beyond).

Memory bound: per activation, K floats of sums, plus X^T X for those asked (K x K float32, or its diagonal
blocks), gathered one layer at a time (layered.py) and dropped once that layer's weights are quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neoxrt.calibration.int4 import block_scales, dequantize_blocks, quantize_blocks

ALPHAS = np.linspace(0.0, 1.0, 11)
GRAM_WHOLE = 2048  # inputs up to this wide keep the whole X^T X; wider ones (NeoX-20B's 6144 and 24576) keep its
GRAM_BLOCK = 2048  # diagonal blocks of this size: GPTQ then spreads errors within a block, at K x 2048 x N multiply-adds
# a weight instead of K^2 N (a third at 6144, a twelfth at 24576) and a twelfth of the memory at 24576
SEARCH_COLUMNS = 512  # output columns per weight the alpha search measures its error on (evenly spaced; all if fewer)


def gram_bounds(k: int) -> list[tuple[int, int]]:
    step = k if k <= GRAM_WHOLE else GRAM_BLOCK
    return [(a, min(k, a + step)) for a in range(0, k, step)]


@dataclass
class ActivationStats:
    """Sums over calibration tokens of one activation: |x| per channel (AWQ's factors), and X^T X (float32, whole or
    its diagonal blocks: `gram_bounds`) when asked."""

    tokens: int = 0
    abs_sum: np.ndarray | None = None
    grams: list[tuple[int, int, np.ndarray]] | None = None
    want_gram: bool = False

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        if self.abs_sum is None:
            k = x.shape[1]
            self.abs_sum = np.zeros(k, np.float64)
            if self.want_gram:
                self.grams = [(a, b, np.zeros((b - a, b - a), np.float32)) for a, b in gram_bounds(k)]
        self.tokens += x.shape[0]
        self.abs_sum += np.abs(x).sum(axis=0)
        for a, b, gram in self.grams or ():
            gram += x[:, a:b].T @ x[:, a:b]

    def quadratic(self, d: np.ndarray) -> float:
        """sum over output columns of d^T G d: the squared output error of a weight error d [K, n]."""
        return float(sum(np.einsum("kn,kn->", gram @ d[a:b], d[a:b]) for a, b, gram in self.grams))

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class GroupChoice:
    alpha: float
    error: float
    error_alpha0: float  # the same objective with s = 1
    factors: np.ndarray = field(repr=False)


def scale_factors(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s_k = mean|X_k|^alpha / geometric mean, floored so that dead channels do not blow up."""
    s = np.maximum(mean_abs, 1e-8) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def rounded(w: np.ndarray, block: int, s: np.ndarray) -> np.ndarray:
    """Q(W s) / s as fp32, with round-to-nearest block scales."""
    ws = w * s[:, None]
    scales = block_scales(ws, block)
    return dequantize_blocks(quantize_blocks(ws, scales), scales) / s[:, None]


def search_group(weights: list, st: ActivationStats, block: int) -> GroupChoice:
    """The alpha (and factors) with the least output error over the weights fed by one activation, measured on
    `SEARCH_COLUMNS` evenly spaced output columns of each weight (the error is a sum over columns, and the factors
    are per input channel: a sample of columns ranks the alphas as all of them do, at a fraction of the cost)."""
    sampled = []
    for weight in weights:
        n = weight.shape[1]
        cols = np.unique(np.linspace(0, n - 1, min(n, SEARCH_COLUMNS)).astype(np.int64))
        sampled.append(np.asarray(weight[:, cols], np.float32))
    best = None
    err0 = None
    for alpha in ALPHAS:
        s = scale_factors(st.mean_abs, alpha)
        err = sum(st.quadratic(rounded(w, block, s) - w) for w in sampled)
        if alpha == 0.0:
            err0 = err
        if best is None or err < best.error:
            best = GroupChoice(float(alpha), err, 0.0, s)
    best.error_alpha0 = err0
    return best
