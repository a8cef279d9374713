"""Range selection from activation statistics: per-tensor symmetric thresholds T, INT8 scale = T / 127.

- minmax: T = max |x|.
- percentile: T = the p-th percentile of |x| (histogram, 2048 bins over [0, max|x|]).
- entropy: T minimising KL(P || Q) between the clipped |x| histogram and its 128-level quantisation --
  the algorithm of TensorRT's entropy calibrator (Migacz, GTC 2017).
"""

from __future__ import annotations

import numpy as np

BINS = 2048
LEVELS = 128


def percentile_threshold(hist: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    cdf = np.cumsum(hist, dtype=np.float64)
    if cdf[-1] == 0:
        return float(edges[-1])
    i = int(np.searchsorted(cdf, cdf[-1] * percentile / 100.0))
    return float(edges[min(i + 1, len(edges) - 1)])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    nz = p > 0
    if np.any(q[nz] == 0):
        return float("inf")
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, stride: int = 16) -> float:
    """Threshold (a histogram edge at or past LEVELS bins) whose 128-level quantisation loses least (KL)."""
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return float(edges[-1])
    best_i, best_kl = len(hist), float("inf")
    for i in range(LEVELS, len(hist) + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()  # outliers clipped into the last bin
        # Q: the unclipped first i bins quantised to LEVELS groups, each group's mass spread over its non-empty
        # bins; KL(P || Q) then charges both the rounding and the mass clipped into P's last bin
        q = np.zeros(i)
        for idx in np.array_split(np.arange(i), LEVELS):
            nonzero = hist[idx] > 0
            if nonzero.any():
                q[idx[nonzero]] = hist[idx].sum() / nonzero.sum()
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(edges[best_i])


def choose_threshold(method: str, absmax: float, hist: np.ndarray | None, percentile: float) -> float:
    if method == "minmax" or hist is None or absmax == 0:
        return float(absmax)
    edges = np.linspace(0.0, absmax, len(hist) + 1)
    if method == "percentile":
        return percentile_threshold(hist, edges, percentile)
    return entropy_threshold(hist, edges)
