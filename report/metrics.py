"""Numerical comparison as typed results (numpy only): tensor differences, teacher-forced statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TensorDiff:
    """Candidate vs reference for one tensor, over the valid elements."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    worst_index: tuple  # index of the largest absolute error in the full tensor
    count: int

    def to_dict(self) -> dict:
        return {**asdict(self), "worst_index": list(self.worst_index)}


def tensor_diff(name: str, candidate: np.ndarray, reference: np.ndarray, valid: np.ndarray | None = None) -> TensorDiff:
    """valid: boolean mask broadcastable to the tensor; invalid elements (padding) are not compared."""
    cand, ref = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if cand.shape != ref.shape:
        raise ValueError(f"{name}: candidate shape {cand.shape} != reference shape {ref.shape}")
    err = np.abs(cand - ref)
    if valid is not None:
        err = np.where(np.broadcast_to(valid, err.shape), err, 0.0)
        count = int(np.broadcast_to(valid, err.shape).sum())
    else:
        count = err.size
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    rel = err / np.maximum(np.abs(ref), 1e-6)
    mean = float(err.sum() / max(count, 1))
    not_finite = not np.isfinite(cand[np.broadcast_to(valid, cand.shape)] if valid is not None else cand).all()
    return TensorDiff(name, float("inf") if not_finite else float(err.max()), float(rel.max()), mean,
                      tuple(int(i) for i in worst), count)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class TeacherForced:
    """Accumulates next-token statistics over windows; positions are window positions 0..L-2."""

    nll_ref: float = 0.0
    nll_cand: float = 0.0
    tokens: int = 0
    top1_agree: np.ndarray | None = None  # per position counts
    top5_overlap: np.ndarray | None = None
    kl: np.ndarray | None = None
    windows: int = 0

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray, ids: np.ndarray) -> None:
        """ref/cand logits [B, L, V], ids [B, L]; predicts ids[:, 1:] from positions [:, :-1]."""
        ref_lp, cand_lp = log_softmax(ref_logits[:, :-1]), log_softmax(cand_logits[:, :-1])
        target = ids[:, 1:, None]
        self.nll_ref -= float(np.take_along_axis(ref_lp, target, -1).sum())
        self.nll_cand -= float(np.take_along_axis(cand_lp, target, -1).sum())
        self.tokens += target.size
        agree = (ref_lp.argmax(-1) == cand_lp.argmax(-1)).sum(0)
        top5_r = np.argpartition(-ref_lp, 5, axis=-1)[..., :5]
        top5_c = np.argpartition(-cand_lp, 5, axis=-1)[..., :5]
        overlap = np.array([[len(set(a) & set(b)) / 5 for a, b in zip(ra, ca)] for ra, ca in zip(top5_r, top5_c)]).sum(0)
        kl = (np.exp(ref_lp) * (ref_lp - cand_lp)).sum(-1).sum(0)
        self.top1_agree = agree if self.top1_agree is None else self.top1_agree + agree
        self.top5_overlap = overlap if self.top5_overlap is None else self.top5_overlap + overlap
        self.kl = kl if self.kl is None else self.kl + kl
        self.windows += len(ids)

    def summary(self) -> dict:
        ppl_ref, ppl_cand = float(np.exp(self.nll_ref / self.tokens)), float(np.exp(self.nll_cand / self.tokens))
        return {
            "tokens": self.tokens,
            "windows": self.windows,
            "perplexity_reference": ppl_ref,
            "perplexity_candidate": ppl_cand,
            "perplexity_delta_pct": 100.0 * (ppl_cand - ppl_ref) / ppl_ref,
            "top1_agreement": float(self.top1_agree.sum() / self.tokens),
            "top5_overlap": float(self.top5_overlap.sum() / self.tokens),
            "kl_mean": float(self.kl.sum() / self.tokens),
            "per_position": {
                "top1_agreement": (self.top1_agree / self.windows).tolist(),
                "kl": (self.kl / self.windows).tolist(),
            },
        }


def first_divergence(candidate: list[int], reference: list[int]) -> int:
    """Index of the first differing token (== match length); len when one is a prefix of the other."""
    n = 0
    while n < min(len(candidate), len(reference)) and candidate[n] == reference[n]:
        n += 1
    return n
