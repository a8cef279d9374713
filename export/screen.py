"""The screened LM head (`neoxrt export --lm-head screened`): fp32 greedy tokens for a quarter of the LM head's
bytes per token.

At batch 1 a decode step reads every weight once, and the LM head is a third of a Pythia-160m's fp32 bytes
(38.6 M of 124 M parameters) and most of the 14m model's. The head only has to find the largest logit
exactly; the others may be approximate within a bound. So the graph computes all logits from an INT8 copy
of the head (symmetric per token, ONNX Runtime's MatMulNBits), bounds each one's error, and recomputes from
the fp32 weights only the tokens whose upper bound reaches the best lower bound -- the largest true logit
is always among them (1024 positions of held-out text on the trained 14m model: 3 tokens at the median,
13 at the 90th percentile, at most 80; on random Pythia-160m weights, whose logits are nearly flat, 286 /
641 / 1168 of 50304).

    h [B,S,Hd] --MatMul(DequantizeLinear(int8 W^T, scale))--> approx [B,S,V]
    |h|: L1 and max per position [B,S,2] --MatMul(C [2,1])--> 2E [B,S,1]  (E bounds every token's error)
    candidates = tokens with approx >= max(approx) - 2E, over every row and position      [n]
    h --MatMul(fp32 W rows gathered at the candidates)--> exact [B,S,n]
    logits = approx with exact scattered in at the candidates

The bound, per token j and position with activations x: the weight rounding term ||x||_1 * max_k |W_kj -
W^_kj| (the int8 rounding error, measured from the weights at export), plus the activation term
max|x| / 254 * ||W^_j||_1 (ONNX Runtime's MatMulNBits at its default accuracy level 4 quantizes x to int8
per block, symmetric, scale max|x_b| / 127, round to nearest -- MLAS QuantizeARow_CompInt8 -- so each value
moves by at most max|x| / 254), each with 1 % slack, plus fp32 accumulation slack; tested against ONNX
Runtime's own products (tests/export/test_screen.py). So: the largest logit and the greedy token are fp32's
(up to the summation order of the recomputed dot products, ~1e-6); every other logit is within its bound of
fp32's, which sampling over the whole vocabulary would see (use the exact head for sampling where that
matters).

Why the largest true logit t* (token j*) is a candidate: every approx a_j is within E of t_j, so
a_j* >= t* - E >= t_i - E >= a_i - 2E for every i. One bound for all tokens (the largest per-token
coefficients) keeps the screen to a few passes over the vocabulary; a bound per token would leave fewer
candidates (14m: 1 at the median; random 160m: 74) for three more passes.
"""

from __future__ import annotations

import numpy as np

from neoxrt.calibration.qdq import quantize_weight
from neoxrt.export.graph import GraphBuilder

QMAX = 127
SLACK = 1.01  # on each measured or derived rounding term
ROWS = 4096  # rows of the head quantized at a time (memory: a block, not the head, in fp32)
ACCUMULATION_SLACK = 2e-6  # times max |W^_j|, per unit of ||x||_1: fp32 sums of the per-block partial products


def screen_constants(w) -> dict[str, np.ndarray]:
    """From the LM head `w` [V, Hd] (checkpoint orientation; numpy or a lazy checkpoint tensor, read a block of
    rows at a time): int8 W^T [Hd, V], its per-token scale [V], the bound's per-token coefficients [2, V] (row 0
    multiplies ||x||_1, row 1 max|x|), and twice their largest values [2, 1] (the graph's 2E)."""
    blocks = w.blocks() if hasattr(w, "blocks") else (w[i:i + ROWS] for i in range(0, len(w), ROWS))
    q, scale, bound = [], [], []
    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        qt, s = quantize_weight(block.T, QMAX)  # per token (a column of W^T), as calibration's weights
        qb = qt.T
        dequantized = qb.astype(np.float32) * s[:, None]
        weight_term = np.abs(block - dequantized).max(axis=1) * SLACK + ACCUMULATION_SLACK * np.abs(dequantized).max(axis=1)
        activation_term = np.abs(dequantized).sum(axis=1) / (2 * QMAX) * SLACK
        q.append(qb)
        scale.append(s)
        bound.append(np.stack([weight_term, activation_term]))
    bound = np.concatenate(bound, axis=1).astype(np.float32)  # [2, V]: per token
    twice_max = (2 * bound.max(axis=1, keepdims=True)).astype(np.float32)  # [2, 1]: 2E, for every token
    return {"int8": np.ascontiguousarray(np.concatenate(q).T), "scale": np.concatenate(scale), "bound": bound,
            "twice_max": twice_max}


def screened_logits(g: GraphBuilder, h: str, rows: str, constants: dict[str, np.ndarray], out: str, opset: int) -> str:
    """Emit the screened head over `h` [B,S,Hd] fp32 into `out` [B,S,V]; `rows`: the fp32 head as [V, Hd]
    (an initializer name); `constants`: screen_constants of it; `opset`: the graph's (ReduceMax takes its axes
    as an input from opset 18, as an attribute before)."""

    def reduce_max(x: str, axes: list[int], keepdims: int) -> str:
        if opset >= 18:
            return g.op("ReduceMax", [x, g.const(axes)], keepdims=keepdims)
        return g.op("ReduceMax", [x], axes=axes, keepdims=keepdims)

    g.scope = "/lm_head/screen"
    q = g.weight("lm_head.screen.int8", constants["int8"])
    scale = g.weight("lm_head.screen.scale", constants["scale"])
    zero = g.weight("lm_head.screen.zero_point", np.zeros_like(constants["scale"], np.int8))
    approx = g.op("MatMul", [h, g.op("DequantizeLinear", [q, scale, zero], axis=1)])  # [B,S,V]
    magnitude = g.op("Abs", [h])
    last = g.const([-1])
    stats = g.op("Concat", [g.op("ReduceSum", [magnitude, last], keepdims=1),
                            reduce_max(magnitude, [-1], 1)], axis=-1)  # [B,S,2]
    twice_e = g.op("MatMul", [stats, g.weight("lm_head.screen.bound", constants["twice_max"])])  # [B,S,1]
    floor = g.op("Sub", [reduce_max(approx, [-1], 1), twice_e])  # [B,S,1]
    reach = reduce_max(g.op("Sub", [approx, floor]), [0, 1], 0)  # [V], >= 0: candidate
    picked = g.op("Squeeze", [g.op("NonZero", [g.op("GreaterOrEqual", [reach, g.const(0.0, "float32")])]),
                              g.const([0])])  # [n]
    exact_rows = g.op("Gather", [rows, picked], axis=0)  # [n, Hd] fp32
    exact = g.op("MatMul", [h, g.op("Transpose", [exact_rows], perm=[1, 0])])  # [B,S,n]
    where = g.op("Expand", [picked, g.op("Shape", [exact])])  # [B,S,n]
    return g.op("ScatterElements", [approx, where, exact], [out], axis=2)
