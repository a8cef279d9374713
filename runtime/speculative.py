"""Speculative decoding: the generation loop when a cheap guess is at hand -- a draft artifact (the INT8/INT4
artifact of the same model, or a smaller one with the same tokenizer) or an n-gram match in the text so far
(prompt lookup) -- checked by the target in one step over all the guessed tokens.

    round:  x = last emitted token (in no cache yet)
            draft:   d1..dK  (K draft steps, or the tokens that followed the last n-gram match)
            verify:  target.step_all([x, d1..dK]) -> logits [B, K+1, V]     (one weight read for K+1 tokens)
            accept:  greedy: the longest prefix where d_i == argmax; sampling: accept d_i with min(1, p/q),
                     else draw from normalise((p - q)+); all accepted: draw the bonus from p_K
            emit n+1 tokens; both caches cut back to the accepted length (static cache: the write position;
            dynamic: one repack), n = the batch's smallest acceptance (every emitted token is one the target
            itself would have produced: greedy tokens are identical to the target's, sampled ones are
            distributed as the target's)

K adapts (`next_k`): up by two when a round accepts everything, else halfway down to what it accepted; prompt lookup
takes K = 0 (a plain decode step) when no row's n-gram matches. A TensorRT engine verifies at most the K it was
built for (`neoxrt build --verify-tokens K`: K's ceiling is the smaller of that and num_draft_tokens /
prompt_lookup_tokens); an engine built without it is refused, as target or as draft (whose catch-up step
reads 2 tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from neoxrt.contract import MAX_COUNT
from neoxrt.errors import RuntimeShapeError
from neoxrt.runtime.sampling import GenerationOptions, draw, next_tokens, token_probs
from neoxrt.runtime.structured import Lookahead, masked, masked_guesses


@dataclass(frozen=True)
class SpeculativeOptions:
    """Args:
        num_draft_tokens: the most tokens guessed per round (K's ceiling; K starts here).
        prompt_lookup_tokens: with no draft artifact, guess up to this many tokens from an n-gram match.
        max_ngram: the longest n-gram looked up (then shorter ones, down to 1), as transformers' prompt lookup.
    """

    num_draft_tokens: int = 8
    prompt_lookup_tokens: int = 0
    max_ngram: int = 2

    def __post_init__(self) -> None:
        for name in ("num_draft_tokens", "prompt_lookup_tokens", "max_ngram"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or \
                    not (1 if name != "prompt_lookup_tokens" else 0) <= value <= MAX_COUNT:
                raise RuntimeShapeError(f"{name} must be an integer >= {1 if name != 'prompt_lookup_tokens' else 0}, "
                                        f"got {value!r}")

    @property
    def max_tokens(self) -> int:
        return self.prompt_lookup_tokens or self.num_draft_tokens


def next_k(k: int, accepted: int, drafted: int, kmax: int) -> int:
    """The next round's K: up by two after a round that accepted all `drafted` guesses (as transformers'
    heuristic schedule), else halfway from K down to the accepted count + 1, at least 1. The default ceiling is 8:
    ceilings of 4, 8 and 12 measured alike with an INT8 weights-only draft (`neoxrt bench --engines
    neoxrt-spec-int8-k4,neoxrt-spec-int8-k8,neoxrt-spec-int8-k12`; docs/generation.md)."""
    if accepted >= drafted:
        return min(k + 2, kmax)
    return max(1, min(k - 1, (k + accepted + 1) // 2))


def lookup_draft(sequence: np.ndarray, max_tokens: int, max_ngram: int) -> np.ndarray:
    """Tokens that followed the latest earlier occurrence of the sequence's last n-gram (n = max_ngram..1)."""
    for n in range(min(max_ngram, len(sequence) - 1), 0, -1):
        tail = sequence[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(sequence[:-1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return sequence[start:start + max_tokens]
    return sequence[:0]


class _Draft:
    """The draft model's decoder, kept holding exactly the tokens the target's cache holds (plus `pending`)."""

    def __init__(self, session, batch: int, max_total: int, ids, mask, pos):
        self.decoder = session.decoder(batch, max_total)
        self.decoder.step(ids, mask, pos)
        self.pending = np.zeros((batch, 0), np.int64)  # accepted tokens the draft has not seen yet

    def propose(self, x: np.ndarray, mask: np.ndarray, pos: np.ndarray, k: int, options, seen, rng, constraints):
        """K tokens per row, and the draft's probabilities for them (sampling) or None (greedy); each row's guesses
        held to its constraint (rolled back after)."""
        ahead = Lookahead(constraints)
        try:
            return self._propose(x, mask, pos, k, options, seen, rng, ahead)
        finally:
            ahead.undo()

    def _propose(self, x, mask, pos, k, options, seen, rng, ahead: Lookahead):
        feed = np.concatenate([self.pending, x[:, None]], axis=1)  # the pending tokens' slots are in `mask`
        step_mask = np.concatenate([mask, np.ones((len(x), 1), np.int64)], axis=1)
        step_pos = pos[:, None] + np.arange(-feed.shape[1] + 1, 1)
        tokens, probs = [], []
        logits = self.decoder.step(feed, step_mask, step_pos)
        for i in range(k):
            logits = masked(logits, ahead.current())
            row_seen = seen
            if options.repetition_penalty != 1.0 and tokens:
                drafted = np.stack(tokens, axis=1)
                row_seen = [np.concatenate([s, drafted[j]]) for j, s in enumerate(seen)]
            if options.greedy:
                token = next_tokens(logits, row_seen, options, rng)
            else:
                q = token_probs(logits, row_seen, options)
                probs.append(q)
                token = draw(q, rng)
            tokens.append(token)
            ahead.take(token)
            if i + 1 < k:
                step_mask = np.concatenate([step_mask, np.ones((len(x), 1), np.int64)], axis=1)
                logits = self.decoder.step(token[:, None].astype(np.int64), step_mask, pos[:, None] + i + 1)
        return np.stack(tokens, axis=1).astype(np.int64), (np.stack(probs, axis=1) if probs else None)

    def accept(self, length: int, drafts: np.ndarray, n: int, x_next: np.ndarray) -> None:
        """Cut the draft's cache to `length` tokens (the target's) and note what it still has to read."""
        k = drafts.shape[1]
        if n < k:
            self.decoder.truncate(length)
            self.pending = np.zeros((len(x_next), 0), np.int64)
        else:  # every guess accepted: the draft never read its own last guess
            self.pending = drafts[:, -1:]


def accept_greedy(target_logits: np.ndarray, drafts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-row accepted count, target tokens [B, K+1]) for greedy verification."""
    tokens = target_logits.argmax(axis=-1)
    match = drafts == tokens[:, :-1]
    accepted = np.cumprod(match, axis=1).sum(axis=1)
    return accepted, tokens


def accept_sampled(p: np.ndarray, q: np.ndarray, drafts: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Speculative sampling (Leviathan et al., Chen et al.): p [B, K+1, V] target, q [B, K, V] draft
    probabilities; returns (per-row accepted count n_r, tokens [B, K+1]) where tokens[:, :n_r] are the accepted
    drafts and tokens[:, n_r] is drawn from normalise((p - q)+) (or p_K when all were accepted)."""
    b, k = drafts.shape
    rows = np.arange(b)
    p_d = p[rows[:, None], np.arange(k)[None, :], drafts]
    q_d = q[rows[:, None], np.arange(k)[None, :], drafts]
    ok = rng.random((b, k)) < np.minimum(1.0, p_d / np.maximum(q_d, 1e-30))
    accepted = np.cumprod(ok, axis=1).sum(axis=1)
    tokens = np.concatenate([drafts, np.zeros((b, 1), np.int64)], axis=1)
    for r in range(b):
        n = accepted[r]
        if n < k:
            residual = np.maximum(p[r, n] - q[r, n], 0.0)
            total = residual.sum()
            residual = residual / total if total > 0 else p[r, n]
        else:
            residual = p[r, k]
        tokens[r, n] = draw(residual[None], rng)[0]
    return accepted, tokens


def verify_limit(session, role: str, want: int) -> int:
    """The most guessed tokens one step of `session` verifies, at most `want` (sessions without a
    `verify_tokens` limit, e.g. ONNX Runtime, take any number).

    Raises:
        RuntimeShapeError: a TensorRT engine built without --verify-tokens.
    """
    limit = getattr(session, "verify_tokens", None)
    if limit is None:
        return want
    if limit < 1:
        raise RuntimeShapeError(f"speculative decoding runs several tokens per step, which the {role} engine was not "
                                "built for: rebuild it with neoxrt build --verify-tokens K")
    return min(want, limit)


def speculative_loop(gen, rows: list[list[int]], options: GenerationOptions, spec: SpeculativeOptions,
                     draft_session=None) -> Iterator:
    """The generation loop with guessed tokens; yields `TokenEvent`s like `Generator._loop`."""
    from neoxrt.runtime.generator import RowBook, left_pad

    batch, width = len(rows), max(len(r) for r in rows)
    kmax = verify_limit(gen.session, "model", spec.max_tokens)
    if draft_session is not None:
        verify_limit(draft_session, "draft", 1)
    ids, mask, pos = left_pad(rows, options.pad(gen.eos_token_id))
    # the cache never holds more than the prompt and the new tokens: a verify step of k + 1 tokens runs only
    # while k < the room left (so it ends at most at width + max_new_tokens - 1), the draft stays a token behind
    max_total = width + options.max_new_tokens
    target = gen.session.decoder(batch, max_total)
    draft = _Draft(draft_session, batch, max_total, ids, mask, pos) if draft_session is not None else None
    rng = np.random.default_rng(options.seed)
    book = RowBook(gen, rows, options)
    seen, generated, constraints = book.seen, book.generated, book.constraints
    live = np.arange(batch)
    logits = target.step(ids, mask, pos)
    x = next_tokens(masked(logits, constraints), seen, options, rng).astype(np.int64)
    pos = pos[:, -1] + 1  # the next token's position, per row
    k = kmax
    gen.spec_stats = {"rounds": 0, "drafted": 0, "accepted": 0}
    pending_out = [[int(t)] for t in x]  # tokens to emit this round, per live row
    while True:
        finished = np.zeros(len(live), bool)
        for j, row in enumerate(live):
            for token in pending_out[j]:
                event = book.emit(row, token)
                yield event
                if event.finish_reason is not None:
                    finished[j] = True
                    break
        if finished.all():
            return
        if finished.any():
            keep = np.flatnonzero(~finished)
            target.keep_rows(keep)
            if draft is not None:
                draft.decoder.keep_rows(keep)
                draft.pending = draft.pending[keep]
            mask, pos, x, live = mask[keep], pos[keep], x[keep], live[keep]
        room = min(options.max_new_tokens - len(generated[r]) for r in live)
        length = mask.shape[1]
        if draft is not None:
            k_now = max(1, min(k, room - 1)) if room > 1 else 0
            drafts, q = draft.propose(x, mask, pos, k_now, options, [seen[r] for r in live], rng,
                                      [constraints[r] for r in live]) if k_now else (None, None)
        else:
            guesses = [lookup_draft(seen[r], kmax, spec.max_ngram) for r in live]
            k_now = min(min(len(g) for g in guesses), max(room - 1, 0))
            drafts, q = (np.stack([g[:k_now] for g in guesses]).astype(np.int64), None) if k_now else (None, None)
        if not k_now:  # a plain decode step
            mask = np.concatenate([mask, np.ones((len(live), 1), np.int64)], axis=1)
            logits = target.step(x[:, None], mask, pos[:, None])
            if draft is not None:  # the draft reads x next round
                draft.pending = np.concatenate([draft.pending, x[:, None]], axis=1)
            x = next_tokens(masked(logits, [constraints[r] for r in live]), [seen[r] for r in live], options,
                            rng).astype(np.int64)
            pos = pos + 1
            pending_out = [[int(t)] for t in x]
            continue
        feed = np.concatenate([x[:, None], drafts], axis=1)  # [B, K+1]
        step_mask = np.concatenate([mask, np.ones((len(live), k_now + 1), np.int64)], axis=1)
        verify = target.step_all(feed, step_mask, pos[:, None] + np.arange(k_now + 1))  # [B, K+1, V]
        verify = masked_guesses(verify, [constraints[r] for r in live], drafts)  # a refused guess ends the run
        if options.greedy and options.repetition_penalty == 1.0:
            accepted, tokens = accept_greedy(verify, drafts)
        else:
            p = np.stack([token_probs(verify[:, i], [np.concatenate([seen[r], feed[j, 1:i + 1]])
                                                       for j, r in enumerate(live)], options)
                          for i in range(k_now + 1)], axis=1)
            if options.greedy:  # repetition penalty: the argmax of the penalised logits
                tokens = p.argmax(axis=-1)
                accepted = np.cumprod(drafts == tokens[:, :-1], axis=1).sum(axis=1)
            elif q is None:  # prompt lookup while sampling: the guess is a point mass
                q = np.zeros_like(p[:, :-1])
                q[np.arange(len(live))[:, None], np.arange(k_now)[None, :], drafts] = 1.0
                accepted, tokens = accept_sampled(p, q, drafts, rng)
            else:
                accepted, tokens = accept_sampled(p, q, drafts, rng)
        n = int(accepted.min())
        gen.spec_stats["rounds"] += 1
        gen.spec_stats["drafted"] += k_now * len(live)
        gen.spec_stats["accepted"] += int(accepted.sum())
        out = np.where(accepted[:, None] > n, drafts[:, n:n + 1], tokens[:, n:n + 1])[:, 0] if n < k_now else tokens[:, n]
        pending_out = [[*map(int, drafts[j, :n]), int(out[j])] for j in range(len(live))]
        mask = step_mask[:, :length + n + 1]
        target.truncate(length + n + 1)
        if draft is not None:
            draft.accept(length + n + 1, drafts, n, out)
        x, pos = out.astype(np.int64), pos + n + 1
        if spec.prompt_lookup_tokens == 0:
            k = next_k(k, n, k_now, kmax)
