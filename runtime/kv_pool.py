"""The scheduler's KV-cache pool: static-cache slots allocated once, written in place by the graph.

Mechanism (the static export, `--kv-cache static`): past and present of each cache tensor are bound to the same
memory, and TensorScatter writes each row's new keys and values at that row's own `write_indices` slot, so a step
copies nothing proportional to the context (docs/serving.md has the measurement). The pool owns that memory:

    one flat buffer per cache tensor, capacity_tokens x heads x head_dim values, allocated at start
    live rows 0..B-1 viewed as [B, H, W, D] (W: the width, the longest row's need rounded up)
    row j holds its tokens in slots [0, end_j): no holes; `attention_mask` is slot < end (computed, not stored)

    add(rid, reserve)   a row at the end (admission checks `fits` first: B x the largest reservation <= capacity)
    run(rids, ids, n)   one graph run over consecutive rows: row j writes its ids at slots end_j.. (its first n_j
                        are real, the rest right padding that the mask hides and the next write overwrites)
    remove(rid)         the last row's slots moved into the hole (one row copy), B - 1

The width grows when a run needs more slots (a repack of the live rows, amortised by rounding up) and shrinks when
the longest rows have left, so short rows do not keep paying for a long one that is gone; while a long row is live
every row is bound at its width (the static graph attends over the bound slots, masked; measured on ONNX Runtime,
short rows beside a long one pay a fraction of the long one's step: docs/serving.md).

`PrefixCache` keeps finished and running rows' keys and values by blocks of `block` tokens, keyed on the token ids
of the whole prefix up to the block's end (exact, as vLLM's chained block hashes make it), in an arena of its own allocated
once, evicted least recently used; a new row whose prompt starts with cached blocks gets them copied into its slots
instead of computing them. `attach` lets a row whose prompt is done attend the pool's shared prefix (held once)
instead of its own copy: its decode steps read the prefix once with every other attached row (runtime/pool_graph.py).

Memory bound: (capacity_tokens + prefix blocks x block) x layers x 2 x heads x head_dim values of the cache dtype,
allocated once; a repack moves the live rows in place (at most one row-head block of keys or values copied aside).

The storage is this class's host arrays bound to ONNX Runtime; `runtime/trt_pool.py`'s `DeviceKVPool` keeps the
same rows in device buffers of a TensorRT engine, overriding the storage methods (`_storage`, `_copy_row`,
`_relayout`, `_new_arena`, `_block_io`, `_execute`) and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import NeoxrtError, RuntimeShapeError
from neoxrt.runtime import pool_graph

WIDTH_STEP = 64  # the width is a multiple of this; it grows to the widest reservation (repacks are rare)


def token_bytes(session) -> int:
    """Cache bytes one token takes in every layer (keys and values)."""
    spec = {s.name: s for s in session.io_spec()[0]}[io.past_key(0)]
    _, heads, _, head_dim = spec.shape
    return 2 * session.num_layers * int(heads) * int(head_dim) * np.dtype(spec.dtype).itemsize


# a prefix this long or longer, copied from the prefix cache, becomes the shared prefix that rows attend instead of
# holding it (their decode steps read it once, not once a row: KVPool.attach)
MIN_SHARED = 128
PREFIX_SHARE = 0.25  # of the pool's memory, for the prefix cache's arena (when it is on)
MEMORY_SHARE = 0.25  # the default pool: at most this share of the memory available at start


def default_memory(session, max_rows: int, max_positions: int, prefix: bool = True) -> int:
    """The default pool size in bytes: what `max_rows` rows of the whole context need (plus the prefix cache's
    share), but no more than a quarter of the memory available now (`available_memory`: MemAvailable, within
    this process's memory cgroup)."""
    from neoxrt.runtime.ort_session import available_memory

    need = max_rows * max_positions * token_bytes(session)
    if prefix:
        need = int(need / (1 - PREFIX_SHARE))
    return min(need, int(available_memory() * MEMORY_SHARE))


def pool_for(session, max_rows: int, memory: int, max_positions: int, prefix: bool = True, block: int = 32,
             cls: type | None = None, max_width: int | None = None, pool_graph: bool = True) -> KVPool:
    """A pool of `memory` bytes: the prefix cache's share (when on) in blocks of `block` tokens, the rest slots
    (`cls`: KVPool, or runtime/trt_pool.py's DeviceKVPool).

    Raises:
        NeoxrtError: the memory holds less than one row of `block` tokens.
    """
    per_token = token_bytes(session)
    live = int(memory * (1 - PREFIX_SHARE)) if prefix else memory
    blocks = int(memory * PREFIX_SHARE) // (per_token * block) if prefix else 0
    tensors = 2 * session.num_layers  # a pool's scratch tensors (the device pool's repacks) come out of the slots
    capacity = live * tensors // (per_token * (tensors + (cls or KVPool).SCRATCH_TENSORS))
    if capacity < block:
        raise NeoxrtError(f"--kv-cache-memory {memory / 2**30:.3f} GiB holds {capacity} tokens of this model's cache "
                          f"({per_token} bytes a token); expected room for at least {block}")
    return (cls or KVPool)(session, max_rows, capacity, blocks, block, max_positions, max_width, pool_graph)


def is_static(session) -> bool:
    return any(s.name == io.WRITE_INDICES for s in session.io_spec()[0])


class KVPool:
    """Static-cache slots of up to `max_rows` rows, `capacity_tokens` slots in all, over an `OrtSession` of a
    static-cache export."""

    SCRATCH_TENSORS = 0  # buffers of one cache tensor's size beside the slots (repacks in place here)
    form = "export"  # the graph a run executes: "export" (model.onnx as exported) or "gqa" (runtime/pool_graph.py)
    # a run's own cost in tokens of compute (its weights read once): rows share a padded run while their padding
    # costs less than the runs saved. Measured on this pool, Pythia-160m shape, 2 Zen 4 cores: one row of 1 token
    # 20-22 ms, of 16-128 tokens 1.07-1.11 ms a token plus 9-16 ms; 2 Zen 3 cores (AVX2): a row of 16 tokens after a
    # 768-token past 62-70 ms, of 256 tokens 405-570 ms, about 20 tokens a run (a run's cost and a token's both
    # scale with the weights, so the ratio holds across model sizes). None: padding up to the real tokens
    run_tokens: int | None = 16
    # a prompt whose remainder after its chunk would be under this share of the chunk takes it with the chunk: its
    # first token a step sooner and the tail's own run saved, for a chunk at most this much longer than the budget
    # (measured in the scheduler's shared-prefix load, 2 Zen 3 cores: a 784-token prompt's first token after 3
    # runs instead of 4). 0: the budget always
    tail_share: float = 0.25
    _shared_form = False
    shares = False  # whether rows may attend a shared prefix held once (the pool form with query_seqlens: _storage)

    def __init__(self, session, max_rows: int, capacity_tokens: int, prefix_blocks: int = 0, block: int = 32,
                 max_positions: int = 1 << 30, max_width: int | None = None, pool_graph: bool = True):
        """`max_positions`: the model's context (padding positions are clamped below it: the rotary tables end
        there); `prefix_blocks` blocks of `block` tokens for prefix reuse (0: off); `max_width`: the most slots a
        run may bind per row (a TensorRT engine's cache profile; None: no bound but the capacity); `pool_graph`:
        run the graph's pool form where it applies (runtime/pool_graph.py; False: the graph as exported)."""
        self._check(session)
        if max_rows < 1 or capacity_tokens < 1:
            raise NeoxrtError(f"the KV-cache pool needs max_rows >= 1 and capacity_tokens >= 1, got {max_rows} and "
                              f"{capacity_tokens}")
        spec = {s.name: s for s in session.io_spec()[0]}[io.past_key(0)]
        _, self.heads, _, self.head_dim = (int(x) if not isinstance(x, str) else x for x in spec.shape)
        self.dtype = np.dtype(spec.dtype)
        self.session, self.max_rows, self.capacity = session, max_rows, capacity_tokens
        self.max_positions, self.max_width = max_positions, max_width or capacity_tokens
        self.names = [n for i in range(session.num_layers) for n in (io.past_key(i), io.past_value(i))]
        self.presents = [n.replace("past_key_values.", "present.") for n in self.names]
        self.logits_spec = logits = next(o for o in session.io_spec()[1] if o.name == io.LOGITS)
        self.all_logits = io.logits_rows(logits, 2) == 2
        # a run may ask for the last position's logits only: prompt chunks then skip the LM head but at their last
        self.keeps = self.all_logits and bool(getattr(session, "keeps_logits", False))
        self.ragged_last = False  # whether `last` gives each row's last real token when the rows' lengths differ
        self.vocab = logits.shape[-1]
        self.rows: list = []  # request ids, in slot order
        self.ends: list[int] = []  # per row: tokens cached (= the next write slot)
        self.offsets: list[int] = []  # per row: the shared prefix's tokens it attends before its slots (0: none)
        self.reserved: list[int] = []  # per row: slots it may grow to (prompt + max_new_tokens)
        self.width = 0
        self.repacks = 0
        self.pool_graph = pool_graph
        self._storage()
        self.prefix = PrefixCache(self, prefix_blocks, block) if prefix_blocks else None
        self.shared: tuple | None = None  # (the shared prefix's token ids, its cache tensors [1, H, P, D])

    @property
    def chunk_pasts(self) -> bool:
        """Whether a run of several tokens may take several rows with a past (the pool form's kernel takes one
        before ONNX Runtime 1.32's `query_seqlens`)."""
        from neoxrt.runtime.pool_graph import takes_query_seqlens

        return self.form != "gqa" or takes_query_seqlens()

    # -- storage: host memory bound to ONNX Runtime (runtime/trt_pool.py: device memory, a TensorRT engine) --
    @staticmethod
    def _check(session) -> None:
        if not is_static(session) or not hasattr(session, "pool_session"):
            raise NeoxrtError("the KV-cache pool needs an ONNX Runtime session of a static-cache export "
                              "(neoxrt export --kv-cache static)")

    def _storage(self) -> None:
        """One flat buffer per cache tensor, zeroed (a masked slot still enters attention's products: no NaN). Left
        to fault in as rows first write their slots: committing it at start (written once) made the scheduler's own
        shared-prefix load ~10 % faster but put the whole pool in the server's RSS from the start (docs/serving.md)."""
        self.flat = [np.zeros(self.capacity * self.heads * self.head_dim, self.dtype) for _ in self.names]
        self._logits: dict[tuple, np.ndarray] = {}
        # the graph's pool form where it applies (runtime/pool_graph.py)
        self.sess, self.form = self.session.pool_session() if self.pool_graph else (self.session.sess, "export")
        self.binding = self.sess.io_binding()
        self._io = getattr(self.binding, "_iobinding", None)
        import onnxruntime as ort

        from neoxrt.runtime.ort_session import KEEP_FEEDS

        self._keep_feeds = KEEP_FEEDS
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device() if self._io is not None else None
        inputs = {i.name for i in self.sess.get_inputs()}
        # the pool form's shared prefix (runtime/pool_graph.py): a prefix many rows start with, held once
        self._shared_form = pool_graph.ATTACHED in inputs
        self.shares = self._shared_form and self.all_logits  # an attached row's logits are at its second token
        self._no_prefix = [np.zeros((1, self.heads, 1, self.head_dim), self.dtype) for _ in self.names]
        self._shared_names = [n for i in range(self.session.num_layers)  # in the order of `names`
                              for n in (pool_graph.shared_key(i), pool_graph.shared_value(i))]

    def _copy_row(self, dst: int, src: int, n: int) -> None:
        """Row `src`'s first `n` slots into row `dst` (every cache tensor, at the current width)."""
        for t in range(len(self.names)):
            view = self._view(t, len(self.rows), self.width)
            view[dst, :, :n] = view[src, :, :n]

    def _relayout(self, b: int, keep: int, old: int, width: int) -> None:
        """The `b` rows' first `keep` slots, laid out at `old` slots a row, re-laid at `width`."""
        # in place, one (row, head) block of keep x head_dim values at a time: widening moves every block to a
        # higher offset, so the last goes first; narrowing, the first (no block is overwritten before it moves)
        blocks = range(b * self.heads)
        d = self.head_dim
        for flat in self.flat:
            for i in reversed(blocks) if width > old else blocks:
                flat[i * width * d:(i * width + keep) * d] = flat[i * old * d:(i * old + keep) * d]

    def read(self, t: int) -> np.ndarray:
        """Cache tensor `t` of the live rows, [B, H, W, D], copied out (tests)."""
        return self._view(t, len(self.rows), self.width).copy()

    def write(self, t: int, values: np.ndarray) -> None:
        """Cache tensor `t` of the live rows set to `values` [B, H, W, D] (tests)."""
        self._view(t, len(self.rows), self.width)[...] = values

    def _new_arena(self, blocks: int, block: int):
        return np.zeros((blocks, len(self.names), self.heads, block, self.head_dim), self.dtype)

    def _block_io(self, arena, slot: int, j: int, start: int, block: int, to_arena: bool) -> None:
        """Between arena block `slot` and row `j`'s slots [start, start + block), every cache tensor."""
        for t in range(len(self.names)):
            row = self._view(t, len(self.rows), self.width)[j]  # [H, W, D]
            if to_arena:
                arena[slot, t] = row[:, start:start + block]
            else:
                row[:, start:start + block] = arena[slot, t]

    # -- memory -------------------------------------------------------------------------------------------
    def fits(self, reserve: int) -> bool:
        """Whether one more row reserving `reserve` slots fits beside the live rows."""
        return len(self.rows) < self.max_rows and (len(self.rows) + 1) * max(self.reserved + [reserve]) <= self.capacity

    def used_tokens(self) -> int:
        return len(self.rows) * self.width

    def add(self, rid, reserve: int) -> None:
        """A new empty row at the end, reserving `reserve` slots.

        Raises:
            RuntimeShapeError: it does not fit (call `fits` first).
        """
        if not self.fits(reserve):
            raise RuntimeShapeError(f"KV-cache pool: a row of {reserve} slots does not fit beside {len(self.rows)} "
                                    f"rows reserving up to {max(self.reserved, default=0)} of {self.capacity} slots")
        if (len(self.rows) + 1) * self.width > self.capacity:
            self._reshape(self.capacity // (len(self.rows) + 1))
        self.rows.append(rid)
        self.ends.append(0)
        self.offsets.append(0)
        self.reserved.append(reserve)  # prompt + new tokens: the last is never written, a slot for the shared
        # prefix's token in a row's last run (runtime/pool_graph.py)

    def remove(self, rid) -> None:
        """Free `rid`'s slots: the last row moves into them (one row copy per cache tensor)."""
        j, last = self.rows.index(rid), len(self.rows) - 1
        if j != last:
            if self.ends[last]:
                self._copy_row(j, last, self.ends[last])
            self.rows[j], self.ends[j], self.reserved[j] = self.rows[last], self.ends[last], self.reserved[last]
            self.offsets[j] = self.offsets[last]
        del self.rows[last], self.ends[last], self.reserved[last], self.offsets[last]
        longest = max(self.ends, default=0)
        if not self.rows:
            self.width = 0
        elif _round_up(longest + 1) < self.width // 2:  # the long rows are gone: stop paying for their width
            self._reshape(_round_up(longest + 1))

    def length(self, rid) -> int:
        return self.ends[self.rows.index(rid)]

    def set_length(self, rid, n: int) -> None:
        """As if `rid`'s first `n` slots were written (benchmarks time steps at a context without computing it)."""
        j = self.rows.index(rid)
        if n + 1 > self.width:
            self._reshape(self._grown(n + 1))
        self.ends[j] = n

    def _view(self, t: int, batch: int, width: int) -> np.ndarray:
        n = batch * self.heads * width * self.head_dim
        return self.flat[t][:n].reshape(batch, self.heads, width, self.head_dim)

    def _grown(self, need: int) -> int:
        limit = min(self.capacity // max(len(self.rows), 1), self.max_width)
        if need > limit:
            raise RuntimeShapeError(f"KV-cache pool: a run needs {need} slots per row, {len(self.rows)} rows allow "
                                    f"{limit} of {self.capacity}")
        # straight to the widest reservation (prompt + max_new_tokens: the rows grow to it), so a long prompt costs
        # one repack, not one per chunk; a quarter more than needed beyond it
        return min(max(_round_up(max(self.reserved, default=0)), _round_up(need + need // 4)), limit)

    def _reshape(self, width: int) -> None:
        """Re-lay the live rows at `width` slots each (their written slots copied; the rest is masked)."""
        keep = min(max(self.ends, default=0), width)
        b = len(self.rows)
        if b and keep and width != self.width:
            self._relayout(b, keep, self.width, width)
        self.width = width
        self.repacks += 1

    # -- running --------------------------------------------------------------------------------------------
    def run(self, rids: list, input_ids: np.ndarray, real: np.ndarray | None = None, advance: bool = True,
            last: bool = False) -> np.ndarray:
        """One graph run over the consecutive rows `rids`: row j's `input_ids[j]` are written at its slots from
        its end on, the first `real[j]` of them real (the rest right padding); positions and mask follow from the
        rows' lengths. Returns the logits [b, S or 1, V] (the bound buffer: valid until the next run of that
        shape): [b, 1, V] for a graph of last-position logits, and with `last` where the graph takes
        logits_to_keep (`keeps`); with `advance` the rows' lengths grow by `real`.

        Raises:
            RuntimeShapeError: the rows are not consecutive in the pool, the run needs more slots than allowed, or
                a row attending the shared prefix is given more than one token.
        """
        b, s = input_ids.shape
        lo = self.rows.index(rids[0])
        if self.rows[lo:lo + b] != list(rids):
            raise RuntimeShapeError(f"KV-cache pool: a run takes consecutive rows, got {list(rids)} of {self.rows}")
        real = np.full(b, s, np.int64) if real is None else np.asarray(real, np.int64)
        ends = np.array(self.ends[lo:lo + b], np.int64)
        offsets = np.array(self.offsets[lo:lo + b], np.int64)
        if not self.chunk_pasts and b > 1 and s > 1 and ends.any():
            raise RuntimeShapeError(f"KV-cache pool ({self.form} form): a run of several tokens after a past takes "
                                    f"one row, got {b} rows of {s} tokens")
        attached = offsets > 0
        if attached.any() and s > 1:
            raise RuntimeShapeError(f"KV-cache pool: rows attending the shared prefix run one token a step, got {s}")
        # where a row attends the shared prefix, the kernel takes each row's tokens and one more, the prefix's:
        # counted (and written, at the slot the next step overwrites) for attached rows only (runtime/pool_graph.py)
        lengths = np.where(attached, s + 1, s)
        extra = int(attached.any())
        need = int(ends.max()) + s + extra
        if need > self.width:
            self._reshape(self._grown(need))
        width = self.width
        limit = self.max_positions - 1
        positions = (offsets + ends)[:, None] + np.arange(s)[None]
        feeds = {io.INPUT_IDS: np.ascontiguousarray(input_ids, np.int64),
                 io.ATTENTION_MASK: (np.arange(width)[None] < (ends + real)[:, None]).astype(np.int64),
                 io.POSITION_IDS: np.minimum(positions, limit),
                 io.WRITE_INDICES: ends}
        if self._shared_form:
            feeds[pool_graph.QUERY_LENGTHS] = lengths
            feeds[pool_graph.ATTACHED] = attached.astype(np.int64)
            feeds[pool_graph.EXTRA] = np.array([extra], np.int64)
        if getattr(self.session, "cache_branch", False):  # Optimum's merged decoders
            feeds["use_cache_branch"] = np.array([True])
        logits = self._execute(lo, feeds, real, last)
        if advance:
            for j in range(b):
                self.ends[lo + j] += int(real[j])
        return logits

    def _execute(self, lo: int, feeds: dict, real: np.ndarray, last: bool) -> np.ndarray:
        """The run of `feeds` over rows lo.. (their cache bound in place at the current width); the logits."""
        b, s = feeds[io.INPUT_IDS].shape
        width = self.width
        if self.keeps:
            feeds[io.LOGITS_TO_KEEP] = self._keep_feeds[last]
        dims = (b, s if self.all_logits and not (last and self.keeps) else 1, self.vocab)
        logits = self._logits.get(dims)
        if logits is None:  # one buffer per shape, written in place run after run
            logits = self._logits[dims] = np.empty(dims, np.float32)
        self._feeds = feeds  # bound by pointer: alive until the run is over
        for name, array in feeds.items():
            self._bind(name, array.dtype, array.shape, array.ctypes.data, False)
        self._bind(io.LOGITS, logits.dtype, logits.shape, logits.ctypes.data, True)
        shape = (b, self.heads, width, self.head_dim)
        offset = lo * self.heads * width * self.head_dim * self.dtype.itemsize
        for t, (name, out) in enumerate(zip(self.names, self.presents)):
            pointer = self.flat[t].ctypes.data + offset
            self._bind(name, self.dtype, shape, pointer, False)
            self._bind(out, self.dtype, shape, pointer, True)
        if self._shared_form:  # the shared prefix, or one zero slot where no row of the run attends it
            prefix = self.shared[1] if self.shared is not None and feeds[pool_graph.ATTACHED].any() else \
                self._no_prefix
            for name, array in zip(self._shared_names, prefix):
                self._bind(name, array.dtype, array.shape, array.ctypes.data, False)
        self.sess.run_with_iobinding(self.binding)
        return logits

    def _bind(self, name: str, dtype, shape, pointer: int, output: bool) -> None:
        if self._io is not None:
            (self._io.bind_output if output else self._io.bind_input)(name, self._cpu, dtype, list(shape), pointer)
        else:
            (self.binding.bind_output if output else self.binding.bind_input)(name, "cpu", 0, dtype, list(shape), pointer)

    # -- the shared prefix --------------------------------------------------------------------------------------
    def attach(self, rid, tokens: list[int], reused: int) -> bool:
        """Let row `rid` (its prompt `tokens` computed, none generated yet) attend the shared prefix instead of
        holding it: its slots past the prefix move to slot 0 and its decode steps read the prefix once with every
        other attached row (runtime/pool_graph.py). Where no row attends the shared prefix, a row that got
        `reused` >= `MIN_SHARED` tokens from the prefix cache makes its own first `reused` tokens the shared
        prefix. Returns whether the row attends it."""
        j = self.rows.index(rid)
        if not self.shares or self.offsets[j] or self.ends[j] != len(tokens):
            return False
        if (not self._starts_shared(tokens) and not any(self.offsets)  # no row uses the shared prefix: it may change
                and MIN_SHARED <= reused <= self.capacity // 4):
            self.shared = (tuple(tokens[:reused]), [np.ascontiguousarray(self._view(t, len(self.rows),
                           self.width)[j:j + 1, :, :reused]) for t in range(len(self.names))])
        if not self._starts_shared(tokens) or len(tokens) <= len(self.shared[0]):
            return False
        n = len(self.shared[0])
        for t in range(len(self.names)):
            view = self._view(t, len(self.rows), self.width)
            view[j, :, :self.ends[j] - n] = view[j, :, n:self.ends[j]].copy()
        self.ends[j] -= n
        self.offsets[j] = n
        return True

    def _starts_shared(self, tokens: list[int]) -> bool:
        """Whether there is a shared prefix and `tokens` start with it."""
        return self.shared is not None and tuple(tokens[:len(self.shared[0])]) == self.shared[0]

    # -- prefix reuse -------------------------------------------------------------------------------------------
    def reuse(self, rid, tokens: list[int]) -> int:
        """Copy the cached blocks `tokens` starts with into `rid`'s (empty) slots; returns how many tokens were
        copied (0 without a prefix cache). At least the last token is left to compute (its logits are needed)."""
        if self.prefix is None:
            return 0
        return self.prefix.load(rid, tokens[:len(tokens) - 1])

    def keep(self, rid, tokens: list[int]) -> None:
        """Offer `rid`'s cached tokens (`tokens` are their ids, as many as it has cached) to the prefix cache."""
        if self.prefix is not None:
            self.prefix.store(rid, tokens)


class PrefixCache:
    """Blocks of `block` tokens' keys and values, keyed on the ids of the whole prefix they end (exact: a hash
    is only a dict key, the ids are compared too), least recently used evicted first; in an arena allocated
    once: [blocks, cache tensors, heads, block, head_dim]."""

    def __init__(self, pool: KVPool, blocks: int, block: int):
        self.pool, self.block = pool, block
        self.arena = pool._new_arena(blocks, block)
        self.free = list(range(blocks))
        self.index: OrderedDict[tuple, int] = OrderedDict()  # prefix ids (a tuple) -> arena block; LRU first
        self.hits = self.queries = self.evictions = 0  # tokens found, tokens asked about, blocks evicted

    def _keys(self, tokens: list[int]) -> list[tuple]:
        return [tuple(tokens[:end]) for end in range(self.block, len(tokens) + 1, self.block)]

    def load(self, rid, tokens: list[int]) -> int:
        """Copy the longest cached run of `tokens`' full blocks into `rid`'s slots from 0; returns its length."""
        found = []
        keys = []
        for key in self._keys(tokens):
            slot = self.index.get(key)
            if slot is None:
                break
            keys.append(key)
            found.append(slot)
        self._touch(keys)
        self.queries += len(tokens)
        n = len(found) * self.block
        if not n:
            return 0
        j = self.pool.rows.index(rid)
        if n + 1 > self.pool.width:
            self.pool._reshape(self.pool._grown(n + 1))
        for k, slot in enumerate(found):
            self.pool._block_io(self.arena, slot, j, k * self.block, self.block, to_arena=False)
        self.pool.ends[j] = n
        self.hits += n
        return n

    def store(self, rid, tokens: list[int]) -> None:
        """Copy `rid`'s full blocks not cached yet into the arena (evicting the least recently used)."""
        j = self.pool.rows.index(rid)
        off = self.pool.offsets[j]  # a row attending the shared prefix holds the tokens past it
        keys = self._keys(tokens[:off + self.pool.ends[j]])
        for k, key in enumerate(keys):
            if key in self.index or k * self.block < off:
                continue
            if not self.free:
                if not self.index:
                    return
                _, slot = self.index.popitem(last=False)
                self.evictions += 1
                self.free.append(slot)
            slot = self.free.pop()
            self.pool._block_io(self.arena, slot, j, k * self.block - off, self.block, to_arena=True)
            self.index[key] = slot
        self._touch(keys)

    def _touch(self, keys: list[tuple]) -> None:
        """Mark a chain used, its first block last: eviction takes a chain's tail before its head (a block
        past an evicted one could never be found again)."""
        for key in reversed(keys):
            if key in self.index:
                self.index.move_to_end(key)

    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def _round_up(n: int) -> int:
    return -(-n // WIDTH_STEP) * WIDTH_STEP
