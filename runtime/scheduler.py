"""In-flight batching: requests join the running batch at step boundaries and leave it when they finish.

`Generator` runs one batch from its prompt step to its last token, compacting finished rows out; the
`Scheduler` adds the other half, joining. Two ways of keeping the cache, picked by the artifact:

**The KV-cache pool** (static-cache exports, `--kv-cache static`; `runtime/kv_pool.py` on ONNX Runtime, in host
memory; `runtime/trt_pool.py` on a static-cache TensorRT engine, in device memory): the cache lives in slots
allocated once and written in place. Every step

    1. drops rows whose client went away (`is_cancelled`) and requests still queued likewise: their slots are free
       for this very step;
    2. admits queued requests, oldest first, while the pool can hold prompt + max_new_tokens for each (reserved at
       admission, as TGI does: nothing is preempted later); a prompt that starts with cached blocks gets them
       copied instead of computed (prefix reuse);
    3. runs prompt chunks, at most `prefill_tokens` tokens in all -- the oldest prompt half of them while others
       wait, the others the rest, oldest first, a remainder of a quarter of a chunk or less taken with it (the
       host pool's `tail_share`) -- each row's chunk written at its own slots (consecutive rows in one run,
       right-padded); a row whose prompt is done picks its first token;
    4. runs one decode step for every row past its prompt, each at its own slot, then retires the finished rows
       (their blocks offered to the prefix cache).

So no stream waits for more than one chunk's run, long prompts progress at the budget's pace under any load,
and a decode step reads each row's cache where it lies. A failing run is retried row by row: the row that fails
alone fails (its `on_error`), the others go on.

**The portable path** (dynamic-cache exports and backends without the pool): the cache is carried as arrays
through `Session.run`, so every backend with a `run` works. Every step it drops cancelled rows; admits queued
requests while the batch has room, up to `prefill_tokens` prompt tokens (at least one request): their prompts
run together in one left-padded prompt step (past length 0), each picks its first token, and their caches are
merged into the running batch's, both sides left-padded with masked zeros to one cache length; runs one decode
step for every live row; retires the finished rows and cuts the cache columns every remaining row masks out. Its
length is at most the longest live row, never the sum.

Each request keeps its own `GenerationOptions` and seed: sampling is per row, drawing from its own
`numpy.random.default_rng(seed)` exactly as `Generator` draws for a batch of one, so a request gets the same
tokens as when it runs alone (up to the last-bit differences of batched matmuls). `_pick` and `_emit` are the one
place a row's token is chosen and recorded, for both paths.

Memory bound: the pool's `kv_cache_memory` bytes, allocated once; the portable path: per live row, layers x 2 x
heads x (prompt + max_new_tokens) x head_dim values of the cache dtype, twice during a step (past in, present out).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from neoxrt import contract as io
from neoxrt.engine_meta import DECODE, PROMPT
from neoxrt.errors import ArtifactError, NeoxrtError, RuntimeShapeError
from neoxrt.runtime.generator import Generator, RowBook, TokenEvent, left_pad, token_logprobs
from neoxrt.runtime.kv_pool import KVPool, default_memory, is_static, pool_for
from neoxrt.runtime.sampling import GenerationOptions, constrained_next_tokens, processes, scored_logprobs
from neoxrt.runtime.scheduler_stats import Histogram, SchedulerStats

GREEDY = GenerationOptions(temperature=0.0)  # plain greedy rows' choice: the argmax

__all__ = ["Histogram", "QueueFullError", "Request", "RequestCancelled", "Scheduler", "SchedulerDown", "SchedulerStats"]

# the keywords a request may carry: GenerationOptions' fields, and transformers' max_length
REQUEST_OPTIONS = frozenset(f.name for f in fields(GenerationOptions)) | {"max_length"}


class QueueFullError(NeoxrtError):
    """The scheduler's queue holds its maximum of waiting requests (back-pressure: retry later)."""


class RequestCancelled(NeoxrtError):
    """Given to a cancelled request's `on_error` when it leaves (so a front can send its final response)."""


class SchedulerDown(NeoxrtError):
    """The scheduler's loop has stopped or is stuck (`Scheduler.health` says why); nothing is queued."""


STUCK_S = 120.0  # a step running longer than this makes `health` report the scheduler stuck


@dataclass
class Request:
    """One submitted request: its options, random generator and `RowBook` (tokens, text, stops: `emit` records a
    token and says whether the request is finished, as `Generator`'s loops do for their rows). `on_event` gets its
    `TokenEvent`s (row = the request id) from the scheduler's thread; `on_error` gets the exception if its row fails
    (or `RequestCancelled` when it is cancelled); `is_cancelled` is polled once per step; `on_prompt_logprobs`, when
    given, gets the prompt's log-probabilities once its prompt is computed (before its first event), as
    `Generator.prompt_logprobs` computes them, each with the `options.logprobs` most likely tokens."""

    id: int
    prompt: list[int]
    options: GenerationOptions
    book: RowBook  # its tokens, text and stops: the state `Generator`'s loops keep per row, for one row
    on_event: Callable[[TokenEvent], None]
    on_error: Callable[[Exception], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    on_prompt_logprobs: Callable[[list], None] | None = None
    # decoding state
    rng: np.random.Generator = field(init=False)
    finish_reason: str | None = None
    done: int = 0  # prompt tokens in the cache (the pool: chunked prefill, prefix reuse)
    looked_up: bool = False  # its prompt was looked up in the prefix cache (once: a miss is not asked again)
    reused: int = 0  # prompt tokens copied from the prefix cache
    submitted: float = field(default_factory=time.monotonic)
    last_token: float = 0.0  # when its latest token was emitted
    prompt_scores: list = field(default_factory=lambda: [None])  # on_prompt_logprobs' entries, chunk by chunk

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.options.seed)

    @property
    def generated(self) -> list[int]:
        return self.book.generated[0]

    @property
    def constraint(self):
        """options.structured_outputs compiled for this request (its grammar state; the book advances it), or None."""
        return self.book.constraints[0]

    @property
    def seen(self) -> np.ndarray:
        return self.book.seen[0]

    def emit(self, token: int, logprob: float | None = None, top=None) -> TokenEvent:
        """Record `token`; the event (row = this request's id) says whether the request is finished."""
        event = self.book.emit(0, token, logprob, top)
        event.row = self.id
        self.finish_reason = event.finish_reason
        return event

    def cancelled(self) -> bool:
        return bool(self.is_cancelled and self.is_cancelled())


class Scheduler:
    """In-flight batching over a `Generator`'s session and tokenizer.

    Use `submit()` from any thread, `start()` to run the loop in a thread of its own (or call `step()`
    yourself), `stop()` to end it.
    """

    def __init__(self, generator: Generator, max_batch: int = 16, max_queue: int = 64, prefill_tokens: int = 128,
                 on_step: Callable[[SchedulerStats], None] | None = None, kv_cache_memory: int | None = None,
                 prefix_cache: bool = True, prefix_block: int = 32):
        """Args:
            prefill_tokens: prompt tokens computed per step (the pool: the chunk budget; the portable path: prompt
                tokens admitted, at least one request).
            kv_cache_memory: the pool's bytes (static-cache artifacts on ONNX Runtime), allocated once; None:
                `kv_pool.default_memory`.
            prefix_cache: reuse cached prompt prefixes (the pool only), in blocks of `prefix_block` tokens.

        Raises:
            NeoxrtError: a bound below 1 (max_queue below 0), or a pool too small for one row.
        """
        if max_batch < 1 or max_queue < 0 or prefill_tokens < 1:
            raise NeoxrtError(f"max_batch and prefill_tokens must be >= 1 and max_queue >= 0, got {max_batch}, "
                              f"{prefill_tokens} and {max_queue}")
        self.session = generator.session
        self.limits = engine_limits(self.session)  # a TensorRT engine's profiles bound batch, prompt and context
        if self.limits:
            max_batch = min(max_batch, self.limits["batch"])
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.prefill_tokens = prefill_tokens
        self.on_step = on_step  # called after every step (metrics)
        self.pool: KVPool | None = None
        if is_static(self.session):
            self.pool = self._pool(kv_cache_memory, prefix_cache, prefix_block)
        self.stats = SchedulerStats(pool_capacity=self.pool.capacity if self.pool else 0)
        self._queue: deque[Request] = deque()
        self._live: list[Request] = []
        self._past: list[np.ndarray] = []  # per cache tensor [B, H, P, D], rows in the order of _live
        self._mask = np.zeros((0, 0), np.int64)  # [B, P]
        self._pending = np.zeros(0, np.int64)  # each live row's chosen token, not yet fed
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.last_error: BaseException | None = None  # what ended a step (or the loop) unexpectedly
        self._step_started: float | None = None  # monotonic start of the step in progress (the watchdog's beat)

    def _pool(self, memory: int | None, prefix: bool, block: int) -> KVPool:
        """The KV-cache pool of a static-cache artifact: host memory on ONNX Runtime, device memory on a TensorRT
        engine (its cache profile bounds a row's slots)."""
        positions = self.generator.max_positions
        if hasattr(self.session, "pool_session"):  # ONNX Runtime
            memory = memory or default_memory(self.session, self.max_batch, positions, prefix)
            return pool_for(self.session, self.max_batch, memory, positions, prefix, block)
        from neoxrt.runtime.trt_pool import DeviceKVPool, default_device_memory, engine_slots, is_static_engine

        if not is_static_engine(self.session):
            raise ArtifactError(f"in-flight batching of a static-cache artifact needs ONNX Runtime or a TensorRT "
                                f"engine (their KV-cache pools), got {type(self.session).__name__}; export "
                                f"--kv-cache dynamic for other backends")
        memory = memory or default_device_memory(self.session, self.max_batch, prefix)
        return pool_for(self.session, self.max_batch, memory, positions, prefix, block, cls=DeviceKVPool,
                        max_width=engine_slots(self.session))

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
            SchedulerDown: the loop thread has died or is stuck (`health`).
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
        if self.limits and len(ids) > self.limits["prompt"]:
            raise RuntimeShapeError(f"prompt ({len(ids)} tokens) exceeds the engine's prompt profile of "
                                    f"{self.limits['prompt']} tokens")
        if self.limits and len(ids) + opts.max_new_tokens > self.limits["context"]:
            raise RuntimeShapeError(f"prompt ({len(ids)} tokens) + max_new_tokens ({opts.max_new_tokens}) exceeds the "
                                    f"engine's decode profile of {self.limits['context']} positions")
        if self.pool is not None and len(ids) + opts.max_new_tokens > self.pool.capacity:
            raise RuntimeShapeError(f"prompt ({len(ids)} tokens) + max_new_tokens ({opts.max_new_tokens}) exceeds the "
                                    f"KV-cache pool's {self.pool.capacity} tokens (--kv-cache-memory)")
        down = self.health()
        if down is not None:
            raise SchedulerDown(down)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"server busy: {len(self._queue)} requests already queued (max_queue "
                                     f"{self.max_queue}); retry later")
            request = Request(next(self._ids), ids, opts, RowBook(self.generator, [ids], opts), on_event, on_error,
                              is_cancelled, on_prompt_logprobs)
            self._queue.append(request)
            self.stats.requests += 1
            self.stats.prompt_tokens += len(ids)
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
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._queue and not self._live:
                        self._lock.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 -- a bug in a step: its requests fail, the loop goes on
                    self.last_error = exc
                    self._fail_all(exc)
        except BaseException as exc:  # the thread ends: nothing may wait on it (health() reports it)
            self.last_error = exc
            self._fail_all(SchedulerDown(f"the scheduler stopped: {type(exc).__name__}: {exc}"))
            raise

    def health(self) -> str | None:
        """None while the loop serves (or was never started); else why not: its thread died, or a step has run
        for more than `STUCK_S` seconds."""
        if self._thread is None or self._stopping:
            return None
        if not self._thread.is_alive():
            why = f": {type(self.last_error).__name__}: {self.last_error}" if self.last_error is not None else ""
            return f"the scheduler thread has stopped{why}"
        started = self._step_started
        if started is not None and time.monotonic() - started > STUCK_S:
            return f"a scheduler step has run for {time.monotonic() - started:.0f} s (more than {STUCK_S:.0f})"
        return None

    def _fail_all(self, exc: Exception) -> None:
        """Every live and queued request fails with `exc`; the cache is emptied."""
        with self._lock:
            queued, self._queue = list(self._queue), deque()
            self.stats.queued = 0
        for r in self._live + queued:
            self._fail(r, exc)
        if self.pool is not None:
            for rid in list(self.pool.rows):
                self.pool.remove(rid)
        self._live, self._past, self._pending = [], [], np.zeros(0, np.int64)
        self._mask = np.zeros((0, 0), np.int64)
        self.stats.active = 0
        self.stats.pool_tokens = 0

    def step(self) -> None:
        """One iteration: drop cancelled requests, admit queued ones, prompt work, one decode step."""
        self._step_started = time.monotonic()
        self._drop_cancelled()
        if self.pool is not None:
            self._step_pool()
        else:
            self._step_arrays()
        self._step_started = None
        self.stats.active = len(self._live)
        if self.on_step is not None:
            self.on_step(self.stats)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave (their cache freed now) and get `RequestCancelled` as their last word."""
        with self._lock:
            dropped = [r for r in self._queue if r.cancelled()]
            self._queue = deque(r for r in self._queue if not r.cancelled())
        gone = [r for r in self._live if r.cancelled()]
        if gone:
            self._leave(gone)
        self.stats.cancelled += len(dropped) + len(gone)
        for r in dropped + gone:
            if r.on_error is not None:
                try:
                    r.on_error(RequestCancelled(f"request {r.id} cancelled by its client"))
                except Exception:  # noqa: BLE001 -- it is over either way
                    pass

    def _leave(self, rows: list[Request]) -> None:
        """`rows` leave the batch; their cache is freed."""
        gone = {r.id for r in rows}
        if self.pool is not None:
            for rid in gone:
                self.pool.remove(rid)
            self._live = [r for r in self._live if r.id not in gone]
        else:
            self._keep(np.array([j for j, r in enumerate(self._live) if r.id not in gone], np.int64))

    def _retire_finished(self) -> None:
        done = [r for r in self._live if r.finish_reason]
        if self.pool is not None:
            for r in done:
                if r.finish_reason != "error":
                    self.pool.keep(r.id, r.prompt + r.generated)
        if done:
            self._leave(done)

    def _fail(self, r: Request, exc: Exception) -> None:
        """End `r` alone with `exc` (its `on_error`; an error there is dropped: it must not end other rows)."""
        r.finish_reason = "error"
        self.stats.failed += 1
        if r.on_error is not None:
            try:
                r.on_error(exc)
            except Exception:  # noqa: BLE001 -- the request is over either way
                pass

    # -- the pool's step --------------------------------------------------------------------------------
    def _step_pool(self) -> None:
        pool = self.pool
        with self._lock:  # oldest first; the first that does not fit waits (no overtaking: long prompts get in)
            while self._queue and pool.fits(self._reserve(self._queue[0])):
                r = self._queue.popleft()
                pool.add(r.id, self._reserve(r))
                self._live.append(r)
            self.stats.queued = len(self._queue)
        self._prefill_pool()
        self._retire_finished()
        self._decode_pool()
        self._retire_finished()
        self.stats.pool_tokens = pool.used_tokens()

    @staticmethod
    def _reserve(r: Request) -> int:
        return len(r.prompt) + r.options.max_new_tokens

    def _prefill_pool(self) -> None:
        """Prompt chunks for this step: `prefill_tokens` in all (a prompt's short remainder taken with its chunk:
        `_chunk`). The oldest prompt takes half the budget when others
        wait (all of it alone, and what the others leave), the others the rest, oldest first: a long prompt keeps
        progressing, and short prompts behind it are not held for its whole prefill. (On the pool's
        GroupQueryAttention form, where a chunk costs its tokens however the budget is split, the oldest keeps the
        whole budget unless a prompt behind it has less left, and the others go shortest first.) A prompt that
        shares a block with an older one still computing waits for it (then copies those blocks). Consecutive rows
        of the pool run together (right-padded), the others alone."""
        budget, plan = self.prefill_tokens, {}
        pending = [r for r in self._live if r.done < len(r.prompt)]
        waiting = []
        for j, r in enumerate(pending):  # oldest first, so that a prompt sees what the older ones copied
            if self._behind_its_prefix(r, pending[:j]):
                continue
            if not r.looked_up and r.on_prompt_logprobs is None:  # looked up once, as late as possible (when
                r.looked_up = True  # nothing older computes its blocks): a prompt finished meanwhile may have left them
                r.done = r.reused = self.pool.reuse(r.id, r.prompt)
                self.stats.prefix_hits += r.done
                self.stats.prefix_queries += len(r.prompt)
            waiting.append(r)
        left = {r.id: len(r.prompt) - r.done for r in waiting}
        if self.pool.form == "gqa" and waiting:
            # where attention reads each row's own slots, a chunk costs its tokens however the budget is split
            # (measured: two rows of 128 tokens take what one row of 256 does): halving the oldest's share only
            # delays its first token, worth it for a prompt with less left to compute, which then goes first
            waiting = waiting[:1] + sorted(waiting[1:], key=lambda o: left[o.id])
            split = len(waiting) > 1 and left[waiting[1].id] < left[waiting[0].id]
        else:
            split = len(waiting) > 1
        for k, r in enumerate(waiting):
            if budget == 0:
                break
            share = max(budget // 2, 1) if k == 0 and split else budget
            plan[r.id] = self._chunk(len(r.prompt) - r.done, share)
            budget = max(budget - plan[r.id], 0)
        if budget and waiting and waiting[0].id in plan:  # what the others left goes to the oldest
            first = waiting[0]
            left = len(first.prompt) - first.done
            plan[first.id] = self._chunk(left, plan[first.id] + min(left - plan[first.id], budget))
        by_id = {r.id: r for r in self._live}
        for group in self._groups([rid for rid in self.pool.rows if rid in plan], plan):
            rows = [by_id[rid] for rid in group]
            width = max(plan[r.id] for r in rows)
            ids = np.full((len(rows), width), self.generator.eos_token_id or 0, np.int64)
            for j, r in enumerate(rows):
                ids[j, :plan[r.id]] = r.prompt[r.done:r.done + plan[r.id]]
            last = self.pool.keeps and (self.pool.ragged_last or len({plan[r.id] for r in rows}) == 1) and all(
                r.on_prompt_logprobs is None for r in rows)  # every row's last real token (the chunk's last)
            logits = self._run_rows(rows, ids, np.array([plan[r.id] for r in rows]), last)
            firsts, lasts = [], []
            for r, out in zip(rows, logits):
                if out is None:
                    continue
                n = plan[r.id]
                if r.on_prompt_logprobs is not None:
                    r.prompt_scores += _chunk_logprobs(out[:n], r.prompt, r.done, r.options.logprobs or 0)
                r.done += n
                self.stats.prefill_tokens += n
                self.pool.keep(r.id, r.prompt[:r.done])
                if r.done == len(r.prompt):
                    if r.on_prompt_logprobs is not None:
                        r.on_prompt_logprobs(r.prompt_scores)
                    firsts.append(r)
                    lasts.append(out[n - 1] if len(out) > 1 else out[-1])
            if firsts:
                self._pick(firsts, np.asarray(np.stack(lasts), np.float32))
            # the rows whose prompts are done attend the shared prefix where they start with it (the row that
            # brings the longest copied prefix first: it may make it the shared one)
            for r in sorted(firsts, key=lambda o: -o.reused):
                if not r.finish_reason and self.pool.attach(r.id, r.prompt, r.reused):
                    self.stats.shared_prefix_rows += 1

    def _chunk(self, left: int, share: int) -> int:
        """A prompt's chunk: `share` of its `left` tokens, or all of them where the rest would be under the pool's
        `tail_share` of the chunk (no tail run of a few tokens, the first token a step sooner)."""
        return left if left - share <= share * self.pool.tail_share else min(left, share)

    def _behind_its_prefix(self, r: Request, older: list[Request]) -> bool:
        """Whether `r` should wait a step: it has not started, and an older prompt still computing shares at least
        a prefix-cache block with it (those blocks will be copied once computed, not computed twice)."""
        prefix = self.pool.prefix
        if prefix is None or r.done or r.on_prompt_logprobs is not None:
            return False
        mine = np.asarray(r.prompt)
        for o in older:
            n = min(len(mine), len(o.prompt))
            differ = np.flatnonzero(mine[:n] != np.asarray(o.prompt[:n]))
            shared = (int(differ[0]) if differ.size else n) // prefix.block * prefix.block
            if shared and o.done < shared:
                return True
        return False

    def _groups(self, rids: list, plan: dict) -> list[list]:
        """Runs of consecutive pool rows, cut where the padding would cost more than the runs it saves
        (`KVPool.run_tokens` a run), where the padded chunk would not fit the rows' room in the pool, before a row with a
        past where the pool takes those alone (`chunk_pasts`), or (graphs with the last position's logits only,
        and those taking logits_to_keep, whose equal chunks skip the LM head) where the chunk length changes."""
        groups: list[list] = []
        position = {rid: j for j, rid in enumerate(self.pool.rows)}
        room = min(self.pool.capacity // max(len(self.pool.rows), 1), self.pool.max_width)  # the widest a row may be
        for rid in rids:
            g = groups[-1] if groups else None
            if g and position[g[-1]] + 1 == position[rid]:
                lengths = [plan[x] for x in g] + [plan[rid]]
                slots = max(self.pool.ends[position[x]] for x in g + [rid]) + max(lengths)
                # lengths may differ where every position's logits come back, or each row's last real one
                mixed = self.pool.all_logits and (self.pool.ragged_last or not self.pool.keeps)
                # the pool form before ONNX Runtime 1.32 (no query_seqlens) takes a chunk after a past one row a run
                fresh = self.pool.chunk_pasts or not any(self.pool.ends[position[x]] for x in g + [rid])
                padding = max(lengths) * len(lengths) - sum(lengths)
                if (fresh and (mixed or len(set(lengths)) == 1) and padding <= self._padding_allowed(lengths)
                        and slots <= room):
                    g.append(rid)
                    continue
            groups.append([rid])
        return groups

    def _padding_allowed(self, lengths: list[int]) -> int:
        """Padding tokens a run of chunks of `lengths` may compute: what the runs it saves cost (`run_tokens` a
        run), or, where a run's cost is not measured, up to the real tokens."""
        run = self.pool.run_tokens
        return sum(lengths) if run is None else run * (len(lengths) - 1)

    def _decode_pool(self) -> None:
        """One token for every row past its prompt: one run over the pool rows from the first such row to the
        last (a row between them still in its prompt is fed a masked token that its next chunk overwrites)."""
        decoding = {r.id: r for r in self._live if r.done == len(r.prompt) and r.generated and not r.finish_reason}
        if not decoding:
            return
        span = [j for j, rid in enumerate(self.pool.rows) if rid in decoding]
        by_id = {r.id: r for r in self._live}
        rows = [by_id[rid] for rid in self.pool.rows[span[0]:span[-1] + 1]]
        ids = np.array([[r.generated[-1] if r.id in decoding else 0] for r in rows], np.int64)
        logits = self._run_rows(rows, ids, np.array([int(r.id in decoding) for r in rows]))
        picked = [(r, out) for r, out in zip(rows, logits) if r.id in decoding and out is not None]
        self.stats.steps += 1
        self.stats.row_steps += len(picked)
        if picked:
            self._pick([r for r, _ in picked], np.asarray(np.stack([out[-1] for _, out in picked]), np.float32))

    def _run_rows(self, rows: list[Request], ids: np.ndarray, real: np.ndarray,
                  last: bool = False) -> list[np.ndarray | None]:
        """The pool's run over `rows`, each row's logits [S or 1, V]; a failing run is retried row by row, and a
        row that fails alone fails (None in its place)."""
        try:
            return list(self.pool.run([r.id for r in rows], ids, real, last=last))
        except Exception as exc:  # noqa: BLE001 -- which row? each alone
            if len(rows) == 1:
                self._fail(rows[0], exc)
                return [None]
        alone = []
        for j, r in enumerate(rows):  # the runs alone share one logits buffer: each row's copied out at once
            out = self._run_rows([r], ids[j:j + 1], real[j:j + 1], last)[0]
            alone.append(None if out is None else out.copy())
        return alone

    # -- the portable path's step -----------------------------------------------------------------------
    def _step_arrays(self) -> None:
        """Admit queued requests (one prompt step), one decode step. A failing step is reported to every request
        it touched (`on_error`), which are then dropped."""
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
            live = {r.id for r in self._live}
            for request in self._live + [r for r in joining if r.id not in live]:
                self._fail(request, exc)
            self._live, self._past, self._pending = [], [], np.zeros(0, np.int64)
            self._mask = np.zeros((0, 0), np.int64)

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
        chosen = np.zeros(len(requests), np.int64)
        plain = [j for j, r in enumerate(requests) if r.options.greedy and not processes(r.options)]
        alone = [j for j in range(len(requests)) if j not in plain]
        if plain:  # one argmax for them all (then each constrained one checked, masked where refused)
            try:
                chosen[plain] = constrained_next_tokens(logits[plain], [requests[j].constraint for j in plain],
                                                        [None] * len(plain), GREEDY, None)
            except Exception:  # noqa: BLE001 -- a row's grammar failed: each alone, so that it fails alone
                alone = list(range(len(requests)))
        failed = set()
        for j in alone:
            r = requests[j]
            try:
                chosen[j] = constrained_next_tokens(logits[j:j + 1], [r.constraint], [r.seen],
                                                    GREEDY if j in plain else r.options, r.rng, [len(r.generated)],
                                                    sorted(r.book.stops), in_place=r.options.logprobs is None)[0]
            except Exception as exc:  # noqa: BLE001 -- its grammar (or options) failed: its request ends, not the step
                self._fail(r, exc)
                failed.add(j)
        for j, r in enumerate(requests):
            if j not in failed:
                scored = token_logprobs(logits[j:j + 1], chosen[j:j + 1], r.options.logprobs)
                self._emit(r, int(chosen[j]), *(scored[0] if scored else (None, None)))
        return chosen

    def _emit(self, r: Request, token: int, logprob: float | None = None, top=None) -> None:
        """`token` recorded for `r` (its stops and length decide whether it is finished) and sent to its client; a
        failure there (its grammar refusing the token) ends `r` alone."""
        try:
            event = r.emit(token, logprob, top)
        except Exception as exc:  # noqa: BLE001 -- its own request's failure, not the step's
            self._fail(r, exc)
            return
        self.stats.tokens += 1
        self._timing(r)
        try:
            r.on_event(event)
        except Exception as exc:  # noqa: BLE001 -- a raising callback ends its own request, not the step
            self._fail(r, exc)

    def _timing(self, r: Request) -> None:
        now = time.monotonic()
        if len(r.generated) == 1:
            self.stats.ttft.observe(now - r.submitted)
        else:
            self.stats.itl.observe(now - r.last_token)
        r.last_token = now
        if r.finish_reason:
            self.stats.e2e.observe(now - r.submitted)

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


def engine_limits(session) -> dict[str, int]:
    """{batch, prompt, context} a TensorRT engine's profiles allow ({} for other sessions): the scheduler's rows,
    a prompt's tokens, and prompt + new tokens (the decode profile's past + 1, or its cache slots)."""
    profiles = getattr(session, "profiles", None)
    if not isinstance(profiles, dict) or PROMPT not in profiles or DECODE not in profiles:
        return {}
    prompt, decode = profiles[PROMPT], profiles[DECODE]
    context = decode[io.CACHE_SEQUENCE].max if io.CACHE_SEQUENCE in decode else decode[io.PAST_SEQUENCE].max + 1
    return {"batch": min(prompt[io.BATCH].max, decode[io.BATCH].max), "prompt": prompt[io.SEQUENCE].max,
            "context": context}


def _prompt_logprobs(logits: np.ndarray, prompt: list[int], top: int) -> list:
    """[None, (log p(token | before), [(token, log p)] of the `top` most likely), ...] from one row's prompt-step
    logits [S, V] (left padding cut off)."""
    return [None] + _chunk_logprobs(logits, prompt, 0, top)


def _chunk_logprobs(logits: np.ndarray, prompt: list[int], start: int, top: int) -> list:
    """The entries of `_prompt_logprobs` that a chunk's logits [n, V] (prompt positions start.. start + n - 1)
    give: each position scores the prompt's next token (`scored_logprobs`)."""
    n = min(len(logits), len(prompt) - 1 - start)
    if n <= 0:
        return []
    return scored_logprobs(logits[:n], prompt[start + 1:start + 1 + n], top)


def _left_pad_cols(mask: np.ndarray, width: int) -> np.ndarray:
    return np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))


def _left_pad_cache(cache: np.ndarray, width: int) -> np.ndarray:
    return np.pad(cache, ((0, 0), (0, 0), (width - cache.shape[2], 0), (0, 0)))
