"""Beam search on the KV-cache contract, step for step as transformers 4.57's `_beam_search` (vectorised form):
beams are batch rows; after each step the cache rows are gathered by the beam each survivor came from
(`Decoder.keep_rows`, one gather per step, nothing copied whole).

    per step:  log_softmax(logits) -> processors -> + running beam scores -> top K = max(2, 1 + #eos) x beams
               over beams x vocab -> the best `beams` that did not stop keep running; those that stopped (EOS or
               the length limit) among the top `beams` compete for the finished slots with
               score = sum log p / (generated length ** length_penalty)
    stop:      no running beam can beat the worst finished one (early_stopping False: judged at the current
               length; "never": at max length when length_penalty > 0), or every slot is finished
               (early_stopping True), or every candidate stopped
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neoxrt.runtime.sampling import GenerationOptions, log_softmax, process

NEG = np.float32(-1.0e9)


@dataclass(frozen=True)
class BeamOptions:
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        from neoxrt.contract import MAX_COUNT
        from neoxrt.errors import RuntimeShapeError

        if not isinstance(self.num_beams, int) or isinstance(self.num_beams, bool) or not 1 <= self.num_beams <= MAX_COUNT:
            raise RuntimeShapeError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.early_stopping not in (True, False, "never"):
            raise RuntimeShapeError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.length_penalty, (int, float)) or not np.isfinite(self.length_penalty):
            raise RuntimeShapeError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        n = self.num_return_sequences
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_COUNT or \
                (self.num_beams > 1 and n > self.num_beams):
            raise RuntimeShapeError(f"num_return_sequences must be in [1, num_beams={self.num_beams}] for beam search, "
                                    f"got {n!r}")


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (ties: lower index first, as torch.topk on CPU)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[:, :k]


def _gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(gen, rows: list[list[int]], options: GenerationOptions, beam: BeamOptions) -> list[list[list[int]]]:
    """Per prompt, its `num_return_sequences` best sequences (new tokens only), best first."""
    from neoxrt.runtime.generator import left_pad

    batch, n = len(rows), beam.num_beams
    eos = sorted(options.stops(gen.eos_token_id))
    k = max(2, 1 + len(eos)) * n
    ids, mask, pos = left_pad(rows, options.pad(gen.eos_token_id))
    width = ids.shape[1]
    max_length = width + options.max_new_tokens
    ids, mask, pos = (np.repeat(a, n, axis=0) for a in (ids, mask, pos))
    decoder = gen.session.decoder(batch * n, max_length)
    logits = decoder.step(ids, mask, pos)
    fill = eos[0] if eos else 0
    running = np.full((batch, n, max_length), fill, np.int64)
    running[:, :, :width] = ids.reshape(batch, n, width)
    sequences, lengths = running.copy(), np.zeros((batch, n), np.int64)
    running_scores = np.zeros((batch, n), np.float32)
    running_scores[:, 1:] = NEG
    scores = np.full((batch, n), NEG, np.float32)
    finished = np.zeros((batch, n), bool)
    unsatisfied = np.ones((batch, 1), bool)
    top_mask = np.arange(k) < n
    cur = width
    while True:
        log_probs = log_softmax(np.asarray(logits, np.float32))
        seen = [r[:cur] for r in running.reshape(batch * n, max_length)]
        log_probs = process(log_probs, seen, options, [cur - width] * len(seen), eos).astype(np.float32)
        vocab = log_probs.shape[-1]
        flat = (log_probs.reshape(batch, n, vocab) + running_scores[:, :, None]).reshape(batch, n * vocab)
        idx = _top(flat, k)
        top_scores = np.take_along_axis(flat, idx, axis=1)
        origin, token = idx // vocab, idx % vocab
        top_seq = _gather(running, origin).copy()
        top_seq[:, :, cur] = token
        hits = np.isin(token, eos) | (cur + 1 >= max_length)
        # the best `n` that did not stop run on
        run_scores = top_scores + hits.astype(np.float32) * NEG
        nxt = _top(run_scores, n)
        running, running_scores = _gather(top_seq, nxt), np.take_along_axis(run_scores, nxt, axis=1)
        came_from = np.take_along_axis(origin, nxt, axis=1)
        # the ones that stopped among the top `n` compete for the finished slots
        just = hits & top_mask[None, :]
        done_scores = top_scores / np.float32((cur + 1 - width) ** beam.length_penalty)
        full = finished.all(axis=-1, keepdims=True) & (beam.early_stopping is True)
        done_scores = done_scores + full * NEG + (~unsatisfied) * NEG + (~just) * NEG
        merged_scores = np.concatenate([scores, done_scores], axis=1)
        keep = _top(merged_scores, n)
        sequences = _gather(np.concatenate([sequences, top_seq], axis=1), keep)
        lengths = np.take_along_axis(np.concatenate([lengths, np.full((batch, k), cur + 1 - width)], axis=1), keep, axis=1)
        finished = np.take_along_axis(np.concatenate([finished, just], axis=1), keep, axis=1)
        scores = np.take_along_axis(merged_scores, keep, axis=1)
        cur += 1
        best_len = (max_length - width) if beam.early_stopping == "never" and beam.length_penalty > 0 else cur - width
        best_running = running_scores[:, :1] / np.float32(best_len ** beam.length_penalty)
        worst_done = np.where(finished, scores.min(axis=1, keepdims=True), NEG)
        unsatisfied = unsatisfied & (best_running > worst_done).any(axis=-1, keepdims=True)
        if not (unsatisfied.any() and not (finished.all() and beam.early_stopping is True) and not hits.all()):
            break
        decoder.keep_rows((came_from + np.arange(batch)[:, None] * n).reshape(-1))
        mask = np.concatenate([mask, np.ones((batch * n, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits = decoder.step(running[:, :, cur - 1].reshape(-1, 1), mask, pos)
    out = []
    for b in range(batch):
        out.append([sequences[b, j, width:width + lengths[b, j]].tolist() if finished[b, j] or lengths[b, j]
                    else [] for j in range(beam.num_return_sequences)])
    return out
