"""GPTQ (Frantar et al., 2023) for INT4 blocks: a weight's rows (its input channels) are rounded in order, and
each row's rounding error is spread over the rows not yet rounded so that the layer's output on the calibration
activations moves as little as possible.

    H = X^T X over the calibration tokens ([K, K], or blocks of it on the diagonal for wide inputs)
    U = upper Cholesky factor of (H + damp * mean(diag H) * I)^-1           (`InverseFactor`, once per activation)
    for each row k:  q_k = round(w_k / s_b),  e = (w_k - q_k s_b) / U_kk,  w_j -= U_kj e  for j > k
    s_b = max|w| / 7 over the block's B rows as they stand when the block starts (GPTQ's groups)

The updates are batched (GPTQ's lazy batches, two levels: `_rows`), as matrix products over `LAZY` and `OUTER`
rows. Rows whose channel never carries a value (H_kk = 0) are zeroed: they never reach the output.
Output columns are independent, so a weight is quantized in column slices and never whole in fp32.

Memory: H's factor (K x K float32, or its diagonal blocks), one column slice of the weight and its int8 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neoxrt.calibration.int4 import QMAX, QMIN, block_scales

DAMP = 0.01  # of the mean of diag(H), added to its diagonal (GPTQ's default)
LAZY = 32  # rows whose updates to the rest of their OUTER batch are one matrix product
OUTER = 256  # rows whose updates to every later row are one matrix product (each such product reads and writes all
# the later rows of the slice: LAZY alone made those passes the memory-bound half of GPTQ's time at NeoX-20B width)


@dataclass
class InverseFactor:
    """U (upper, float32) per diagonal block [start, stop) of H, and the dead channels."""

    blocks: list[tuple[int, int, np.ndarray]]
    dead: np.ndarray

    @classmethod
    def of(cls, gram_blocks: list[tuple[int, int, np.ndarray]], damp: float = DAMP) -> InverseFactor:
        dead = np.concatenate([np.diag(h) <= 0 for _, _, h in gram_blocks])
        live = np.concatenate([np.diag(h) for _, _, h in gram_blocks])[~dead]
        shift = damp * (float(live.mean()) if live.size else 1.0)
        out = []
        for start, stop, gram in gram_blocks:  # float32 throughout, as GPTQ's own code: the damping keeps H well posed
            h = np.array(gram, np.float32)
            h[dead[start:stop], dead[start:stop]] = 1.0
            h[np.diag_indices_from(h)] += shift
            out.append((start, stop, upper_inverse_factor(h)))
        return cls(out, dead)


def upper_inverse_factor(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U, from one Cholesky factorization and one triangular inverse: with J
    the reversal, J H J = M M^T gives H = R R^T for the upper R = J M J, so H^-1 = R^-T R^-1 and U = R^-1 (a third
    of the work of inverting H and factoring the inverse)."""
    m = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    return np.ascontiguousarray(lower_inverse(m)[::-1, ::-1])


def lower_inverse(m: np.ndarray, leaf: int = 256) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]
    (its work in two matrix products per level: 0.05 s at K = 2048 here against 0.4-0.5 s for np.linalg.inv, and
    no torch, whose LAPACK kept tens of MB more after each call)."""
    k = len(m)
    if k <= leaf:
        return np.tril(np.linalg.inv(m)).astype(m.dtype)
    half = k // 2
    a_inv, d_inv = lower_inverse(m[:half, :half], leaf), lower_inverse(m[half:, half:], leaf)
    out = np.zeros_like(m)
    out[:half, :half], out[half:, half:] = a_inv, d_inv
    out[half:, :half] = -(d_inv @ m[half:, :half]) @ a_inv
    return out


def gptq_quantize(w: np.ndarray, factor: InverseFactor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, n] weights (a column slice) -> (int8 [K, n] in [-8, 7], scales [K/B, n]); each diagonal block of H
    is worked on its own (its rows see only their own block's errors)."""
    w = np.array(w, np.float32)
    w[factor.dead] = 0.0
    k, n = w.shape
    q = np.empty((k, n), np.int8)
    scales = np.empty((k // block, n), np.float32)
    for start, stop, u in factor.blocks:
        _rows(w[start:stop], u, block, q[start:stop], scales[start // block: stop // block])
    return q, scales


def _rows(w: np.ndarray, u: np.ndarray, block: int, q: np.ndarray, scales: np.ndarray) -> None:
    """GPTQ over the rows of one diagonal block of H, in place (w is consumed). Two levels of lazy batches: the
    rows of a batch of `LAZY` update the rest of their batch of `OUTER` rows (which stays in cache), and an
    OUTER batch updates every later row once, as one product (each later row still gets every earlier row's
    update before it is rounded: the same numbers as updating row by row)."""
    k, lazy = w.shape[0], max(LAZY, block)  # a quantization block starts and ends inside one lazy batch
    outer = max(OUTER, lazy)
    for o0 in range(0, k, outer):
        o1 = min(k, o0 + outer)
        err = np.empty_like(w[o0:o1])
        for b0 in range(o0, o1, lazy):
            b1 = min(o1, b0 + lazy)
            wb, eb = w[b0:b1], err[b0 - o0:b1 - o0]
            for i in range(b1 - b0):
                r = b0 + i
                if r % block == 0:
                    scales[r // block] = block_scales(wb[i:i + block], block)[0]
                s = scales[r // block]
                qi = np.clip(np.rint(wb[i] / s), QMIN, QMAX)
                q[r] = qi
                eb[i] = (wb[i] - qi * s) / u[r, r]
                if i + 1 < b1 - b0:
                    wb[i + 1:] -= np.outer(u[r, r + 1:b1], eb[i])
            if b1 < o1:
                w[b1:o1] -= u[b0:b1, b1:o1].T @ eb
        if o1 < k:
            w[o1:] -= u[o0:o1, o1:].T @ err
