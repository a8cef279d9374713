"""Next-token selection on fp32 logits [B, V], with transformers' semantics and order:
repetition penalty, then temperature, top-k, top-p; temperature 0 is greedy (exact argmax)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neoxrt.errors import RuntimeShapeError


@dataclass(frozen=True)
class GenerationOptions:
    """Keyword names follow transformers' `generate()`."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: run the full max_new_tokens even past EOS

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RuntimeShapeError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise RuntimeShapeError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RuntimeShapeError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if math.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RuntimeShapeError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if math.isnan(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise RuntimeShapeError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if any(not s for s in self.stop_strings):
            raise RuntimeShapeError("stop_strings must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' logits divided by the penalty when
    positive, multiplied when negative."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, tokens in enumerate(seen):
        tokens = np.unique(tokens)
        values = logits[row, tokens]
        logits[row, tokens] = np.where(values < 0, values * penalty, values / penalty)
    return logits


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper: drop the tokens whose ascending cumulative probability is <= 1 - p,
    always keeping the most likely one."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits), axis=-1)
    remove_sorted = cum <= 1 - p
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def token_probs(logits: np.ndarray, seen: list[np.ndarray], options: GenerationOptions) -> np.ndarray:
    """The distribution [B, V] that sampling draws from (greedy: the softmax of the penalised logits, whose
    argmax is the greedy token); speculative decoding compares the target's and the draft's."""
    logits = apply_repetition_penalty(np.asarray(logits, np.float64), seen, options.repetition_penalty)
    if options.greedy:
        return softmax(logits)
    return softmax(apply_top_p(apply_top_k(logits / options.temperature, options.top_k), options.top_p))


def next_tokens(logits: np.ndarray, seen: list[np.ndarray], options: GenerationOptions,
                rng: np.random.Generator) -> np.ndarray:
    """One token per row from last-position logits [B, V]."""
    if options.greedy:
        return apply_repetition_penalty(np.asarray(logits, np.float64), seen, options.repetition_penalty).argmax(axis=-1)
    probs = token_probs(logits, seen, options)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draws).sum(axis=-1), probs.shape[-1] - 1)
