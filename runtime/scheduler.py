"""In-flight batching: requests join the running batch at decode-step boundaries and leave it when they finish.

`Generator` runs one batch from its prompt step to its last token, compacting finished rows out; the
`Scheduler` adds the other half, joining. Every step it

    1. drops rows whose client went away (`is_cancelled`), and requests still queued likewise;
    2. admits queued requests while the batch has room, up to `prefill_tokens` prompt tokens a step (so a burst
       of arrivals gets its first tokens group by group instead of all after one long prompt step, and running
       rows are not stalled long): their prompts run together in one left-padded prompt step of their own
       (past length 0), each picks its first token, and their caches are merged into the running batch's --
       both sides left-padded with masked zeros to one cache length;
    3. runs one decode step for every live row (each row's pending token, its own position ids), picks each
       row's next token with its own options and random generator, and retires the rows that finished;
       the cache columns that every remaining row masks out (left padding) are cut off.

Each request keeps its own `GenerationOptions` and seed: sampling is per row, drawing from its own
`numpy.random.default_rng(seed)` exactly as `Generator` draws for a batch of one, so a request gets the same
tokens as when it runs alone (up to the last-bit differences of batched matmuls). The cache is carried as
arrays through `Session.run` (the portable contract), so every backend with a `run` works; its length is at
most the longest live row (prompt + tokens so far), never the sum.

Memory bound: per live row, layers x 2 x heads x (prompt + max_new_tokens) x head_dim values of the cache
dtype, twice during a step (past in, present out).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import ArtifactError, NeoxrtError, RuntimeShapeError
from neoxrt.runtime.generator import Generator, TextSoFar, TokenEvent, finish_reason, left_pad, token_logprobs
from neoxrt.runtime.sampling import GenerationOptions, log_softmax, next_tokens, processes, top_indices
from neoxrt.runtime.structured import Constraint, masked

# the keywords a request may carry: GenerationOptions' fields, and transformers' max_length
REQUEST_OPTIONS = frozenset(f.name for f in fields(GenerationOptions)) | {"max_length"}


class QueueFullError(NeoxrtError):
    """The scheduler's queue holds its maximum of waiting requests (back-pressure: retry later)."""


@dataclass
class Request:
    """One submitted request. `on_event` gets its `TokenEvent`s (row = the request id) from the scheduler's
    thread; `on_error` gets the exception if a step fails; `is_cancelled` is polled once per step;
    `on_prompt_logprobs`, when given, gets the prompt's log-probabilities from its prompt step (before its first
    event), as `Generator.prompt_logprobs` computes them, each with the `options.logprobs` most likely tokens."""

    id: int
    prompt: list[int]
    options: GenerationOptions
    on_event: Callable[[TokenEvent], None]
    on_error: Callable[[Exception], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    on_prompt_logprobs: Callable[[list], None] | None = None
    constraint: Constraint | None = None  # options.structured_outputs compiled for this request (its grammar state)
    # decoding state
    rng: np.random.Generator = field(init=False)
    seen: np.ndarray = field(init=False)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.options.seed)
        self.seen = np.array(self.prompt, np.int64)

    def cancelled(self) -> bool:
        return bool(self.is_cancelled and self.is_cancelled())


@dataclass
class SchedulerStats:
    """Counters since start; `occupancy` = mean live rows per decode step / max_batch."""

    requests: int = 0
    rejected: int = 0
    cancelled: int = 0
    tokens: int = 0
    steps: int = 0
    row_steps: int = 0
    active: int = 0
    queued: int = 0


class Scheduler:
    """In-flight batching over a `Generator`'s session and tokenizer.

    Use `submit()` from any thread, `start()` to run the loop in a thread of its own (or call `step()`
    yourself), `stop()` to end it.
    """

    def __init__(self, generator: Generator, max_batch: int = 16, max_queue: int = 64, prefill_tokens: int = 128,
                 on_step: Callable[[SchedulerStats], None] | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_tokens < 1:
            raise NeoxrtError(f"max_batch and prefill_tokens must be >= 1 and max_queue >= 0, got {max_batch}, "
                              f"{prefill_tokens} and {max_queue}")
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.prefill_tokens = prefill_tokens  # prompt tokens admitted per step (at least one request)
        self.on_step = on_step  # called after every step (metrics)
        self.session = generator.session
        if any(s.name == io.WRITE_INDICES for s in self.session.io_spec()[0]):
            raise ArtifactError("in-flight batching needs a dynamic-cache artifact (export --kv-cache dynamic, the "
                                "default); this one has a static cache")
        self.stats = SchedulerStats()
        self._queue: deque[Request] = deque()
        self._live: list[Request] = []
        self._past: list[np.ndarray] = []  # per cache tensor [B, H, P, D], rows in the order of _live
        self._mask = np.zeros((0, 0), np.int64)  # [B, P]
        self._pending = np.zeros(0, np.int64)  # each live row's chosen token, not yet fed
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._emitted: dict[int, TextSoFar] = {}

    # -- submitting -------------------------------------------------------------------------------------
    def submit(self, prompt, on_event: Callable[[TokenEvent], None], on_error=None, is_cancelled=None,
               on_prompt_logprobs=None, **options) -> int:
        """Queue a request (text or token ids; keywords: `GenerationOptions`). Returns its id.

        Args:
            on_prompt_logprobs: called once with [None, (log p, [(token, log p)] top N), ...] per prompt token
                (N = `logprobs`, 0 without), computed from the prompt step's logits: echo costs no extra pass.

        Raises:
            RuntimeShapeError: bad prompt or options, or prompt + max_new_tokens past the model's context.
            ArtifactError: prompt log-probabilities asked of a graph that returns the last position's logits only.
            QueueFullError: `max_queue` requests are already waiting.
        """
        unknown = sorted(set(options) - REQUEST_OPTIONS)
        if unknown:  # a request's field that no option takes: named, not a TypeError
            raise RuntimeShapeError(f"unknown generation option {unknown[0]!r}; expected one of "
                                    f"{', '.join(sorted(REQUEST_OPTIONS))}")
        if on_prompt_logprobs is not None:
            self.generator._check_all_logits("prompt log-probabilities score every prompt token")
        (ids,) = self.generator.encode([prompt])
        # the artifact's generation_config.json defaults under the request's keywords, as Generator.stream takes them
        opts = GenerationOptions(**self.generator._with_defaults([ids], options, beams=False))
        self.generator._check_length([ids], opts)
        (constraint,) = self.generator.constraints(1, opts)  # compiled here, on the caller's thread (time-limited)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"server busy: {len(self._queue)} requests already queued (max_queue "
                                     f"{self.max_queue}); retry later")
            request = Request(next(self._ids), ids, opts, on_event, on_error, is_cancelled, on_prompt_logprobs,
                              constraint)
            self._queue.append(request)
            self.stats.requests += 1
            self.stats.queued = len(self._queue)
            self._lock.notify()
        return request.id

    # -- the loop ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="neoxrt-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._queue and not self._live:
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """One iteration: drop cancelled requests, admit queued ones, one decode step. A failing step is
        reported to every request it touched (`on_error`), which are then dropped."""
        self._drop_cancelled()
        with self._lock:
            joining: list[Request] = []
            budget = self.prefill_tokens
            while self._queue and len(self._live) + len(joining) < self.max_batch and (
                    not joining or len(self._queue[0].prompt) <= budget):
                budget -= len(self._queue[0].prompt)
                joining.append(self._queue.popleft())
            self.stats.queued = len(self._queue)
        try:
            if joining:
                self._admit(joining)
            if self._live:
                self._decode()
        except Exception as exc:  # a failed step ends the requests in it, not the server
            for request in self._live + [r for r in joining if r not in self._live]:
                self._emitted.pop(request.id, None)
                if request.on_error is not None:
                    request.on_error(exc)
            self._live, self._past, self._pending = [], [], np.zeros(0, np.int64)
            self._mask = np.zeros((0, 0), np.int64)
        self.stats.active = len(self._live)
        if self.on_step is not None:
            self.on_step(self.stats)

    def _drop_cancelled(self) -> None:
        with self._lock:
            kept = deque(r for r in self._queue if not r.cancelled())
            self.stats.cancelled += len(self._queue) - len(kept)
            self._queue = kept
        gone = [j for j, r in enumerate(self._live) if r.cancelled()]
        for j in gone:
            self._emitted.pop(self._live[j].id, None)
        if gone:
            self.stats.cancelled += len(gone)
            self._keep(np.setdiff1d(np.arange(len(self._live)), gone))

    def _admit(self, joining: list[Request]) -> None:
        """Prompt step for the joining requests together, first token each, caches merged into the batch."""
        pad = self.generator.eos_token_id or 0
        ids, mask, pos = left_pad([r.prompt for r in joining], pad)
        feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos, **self._empty_past(len(joining))}
        out = self.session.run(feeds)
        present = [out[name.replace("past_key_values.", "present.")] for name in self._cache_names()]
        for j, r in enumerate(joining):
            if r.on_prompt_logprobs is not None:
                r.on_prompt_logprobs(_prompt_logprobs(out[io.LOGITS][j, ids.shape[1] - len(r.prompt):], r.prompt,
                                                      r.options.logprobs or 0))
        firsts = self._pick(joining, np.asarray(out[io.LOGITS][:, -1], np.float32))
        self._merge(joining, present, mask, firsts)
        self._retire_finished()

    def _decode(self) -> None:
        b = len(self._live)
        mask = np.concatenate([self._mask, np.ones((b, 1), np.int64)], axis=1)
        pos = np.array([[len(r.prompt) + len(r.generated) - 1] for r in self._live], np.int64)
        feeds = {io.INPUT_IDS: self._pending[:, None], io.ATTENTION_MASK: mask, io.POSITION_IDS: pos}
        feeds.update(zip(self._cache_names(), self._past))
        out = self.session.run(feeds)
        self._past = [out[name.replace("past_key_values.", "present.")] for name in self._cache_names()]
        self._mask = mask
        self.stats.steps += 1
        self.stats.row_steps += b
        self._pending = self._pick(self._live, np.asarray(out[io.LOGITS][:, -1], np.float32))
        self._retire_finished()

    # -- rows -------------------------------------------------------------------------------------------
    def _pick(self, requests: list[Request], logits: np.ndarray) -> np.ndarray:
        """Each request's next token from its logits row (held to its constraint, if any), its own options and
        generator; events sent. Log-probabilities are the model's own (before the constraint's mask)."""
        raw, logits = logits, masked(logits, [r.constraint for r in requests])  # unconstrained rows untouched
        chosen = np.zeros(len(requests), np.int64)
        plain = [j for j, r in enumerate(requests) if r.options.greedy and not processes(r.options)]
        if plain:
            chosen[plain] = logits[plain].argmax(axis=-1)
        for j, r in enumerate(requests):
            if j not in plain:
                chosen[j] = next_tokens(logits[j:j + 1], [r.seen], r.options, r.rng, [len(r.generated)],
                                        sorted(self._stops(r.options)))[0]
        for j, r in enumerate(requests):
            scored = token_logprobs(raw[j:j + 1], chosen[j:j + 1], r.options.logprobs)
            self._emit(r, int(chosen[j]), *(scored[0] if scored else (None, None)))
        return chosen

    def _emit(self, r: Request, token: int, logprob: float | None = None, top=None) -> None:
        r.generated.append(token)
        r.seen = np.append(r.seen, token)
        self.stats.tokens += 1
        self._emitted.setdefault(r.id, TextSoFar())
        if r.constraint is not None:
            r.constraint.advance(token)
        piece, reason = self.generator._piece(r.id, r.generated, self._emitted, r.options)
        reason = finish_reason(token, reason, self._stops(r.options), r.constraint, len(r.generated), r.options)
        r.finish_reason = reason
        r.on_event(TokenEvent(r.id, token, piece, reason, logprob, top))

    def _stops(self, options: GenerationOptions) -> set[int]:
        return options.stops(self.generator.eos_token_id)

    def _retire_finished(self) -> None:
        done = [j for j, r in enumerate(self._live) if r.finish_reason]
        for j in done:
            self._emitted.pop(self._live[j].id, None)
        if done:
            self._keep(np.setdiff1d(np.arange(len(self._live)), done))

    def _keep(self, rows: np.ndarray) -> None:
        """Keep `rows` of the batch, then cut the cache columns every remaining row masks out."""
        self._live = [self._live[j] for j in rows]
        self._pending, self._mask = self._pending[rows], self._mask[rows]
        self._past = [t[rows] for t in self._past]
        if not self._live:
            self._mask = np.zeros((0, 0), np.int64)
            return
        first = int(np.argmax(self._mask.any(axis=0))) if self._mask.size else 0
        if first:
            self._mask = self._mask[:, first:]
            self._past = [t[:, :, first:] for t in self._past]

    def _merge(self, joining: list[Request], present: list[np.ndarray], mask: np.ndarray, firsts: np.ndarray) -> None:
        """Append the joining rows to the batch, left-padding the shorter side's cache and mask."""
        if not self._live:
            self._live, self._past, self._mask, self._pending = list(joining), present, mask, firsts
            return
        width = max(self._mask.shape[1], mask.shape[1])
        old_mask, new_mask = _left_pad_cols(self._mask, width), _left_pad_cols(mask, width)
        self._past = [np.concatenate([_left_pad_cache(a, width), _left_pad_cache(b, width)])
                      for a, b in zip(self._past, present)]
        self._mask = np.concatenate([old_mask, new_mask])
        self._live += joining
        self._pending = np.concatenate([self._pending, firsts])

    # -- cache geometry ---------------------------------------------------------------------------------
    def _cache_names(self) -> list[str]:
        return [n for i in range(self.session.num_layers) for n in (io.past_key(i), io.past_value(i))]

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        spec = {s.name: s for s in self.session.io_spec()[0]}[io.past_key(0)]
        _, heads, _, head_dim = spec.shape
        empty = np.zeros((batch, heads, 0, head_dim), spec.dtype)
        return {name: empty for name in self._cache_names()}


def _prompt_logprobs(logits: np.ndarray, prompt: list[int], top: int) -> list:
    """[None, (log p(token | before), [(token, log p)] of the `top` most likely), ...] from one row's prompt-step
    logits [S, V] (left padding cut off)."""
    logp = log_softmax(np.asarray(logits[:-1], np.float64))
    best = top_indices(logp, top)
    return [None] + [(float(logp[t, tok]), [(int(b), float(logp[t, b])) for b in best[t]])
                     for t, tok in enumerate(prompt[1:])]


def _left_pad_cols(mask: np.ndarray, width: int) -> np.ndarray:
    return np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))


def _left_pad_cache(cache: np.ndarray, width: int) -> np.ndarray:
    return np.pad(cache, ((0, 0), (0, 0), (width - cache.shape[2], 0), (0, 0)))
