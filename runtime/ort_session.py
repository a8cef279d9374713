"""ONNX Runtime backend: a `Session` over an artifact's model.onnx, and a decoder that keeps the KV cache
in pre-allocated buffers bound with I/O binding.

Cost model of one decode step (portable contract: past [B,H,P,D] in, present [B,H,P+1,D] out):
- two flat buffers per cache tensor, sized for the whole generation (B x H x max_total x D), allocated once;
  step t reads past from buffer t%2 and ORT writes present into buffer (t+1)%2 (ping-pong);
- nothing crosses into Python but the last-position logits; no array is allocated per step;
- the graph's Concat copies the cache once per step (O(P) bytes, the price of the portable contract, small
  beside the weight reads at these sizes; `make bench` reports context 1024 against 128, docs/benchmarks.md).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from neoxrt import contract as io
from neoxrt.contract import TensorSpec
from neoxrt.errors import RuntimeShapeError

USE_CACHE_BRANCH = "use_cache_branch"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


KEEP_FEEDS = {False: np.zeros(1, np.int64), True: np.ones(1, np.int64)}  # logits_to_keep: every position / the last


def session_options(threads: int | None = None, base: ort.SessionOptions | None = None,
                    config: dict[str, str] | None = None) -> ort.SessionOptions:
    """Our defaults, plus `config`: session config entries an artifact records for itself (its manifest's
    `onnxruntime_session_config`, e.g. the MatMulNBits block of a weights-only INT8 artifact).

    The intra-op threads stop spinning when a run returns (`session.force_spinning_stop`): by default they spin
    on and hold the cores that the work between steps needs -- sampling, grammar masks on llguidance's threads,
    the server's threads, a speculative draft's own session (measured: the commit that made it the default)."""
    options = base or ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only (TensorScatter warns on every run that is not in place)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def mapped_weights_config(model: Path) -> dict[str, str]:
    """Serve the weights from the memory-mapped model.onnx.data when a prepacked copy would not fit.

    ONNX Runtime maps aligned external data and, by default, copies each MatMul weight into a prepacked
    buffer (anonymous memory, one copy of the weights; slower to load, faster to decode). Without prepacking the
    weights stay file pages: loaded at once, shared between processes, reclaimable -- a model larger than RAM still
    runs (at disk speed).
    fp32 weights go unpacked past half the available memory. 4-bit weights (MatMulNBits) are prepacked
    whenever the copy fits at all: unpacked, ONNX Runtime dequantizes each whole weight to fp32 on every call
    (seconds per token at the NeoX-20B width).
    """
    data = model.with_name(io.WEIGHTS_FILE)
    if not data.is_file():
        return {}
    available = available_memory()
    limit = available if _has_nbits(model) else available // 2
    return {"session.disable_prepacking": "1"} if data.stat().st_size > limit else {}


def _has_nbits(model: Path) -> bool:
    """Whether the graph names the MatMulNBits op (model.onnx holds the graph alone when the weights are
    external: a small file; op types are plain strings in it; the runtime does not depend on `onnx`)."""
    return b"MatMulNBits" in model.read_bytes()


def available_memory() -> int:
    """MemAvailable (free plus reclaimable page cache), or free pages where /proc/meminfo is absent; no more
    than what this process's memory cgroup (v1 or v2: a container's limit) leaves."""
    host = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        pass
    if host is None:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    left = cgroup_memory_left()
    return host if left is None else min(host, left)


def cgroup_memory_left(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """limit - usage of the tightest memory cgroup on this process's path (None: no limit found)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: memory.max / memory.current
            folder, limit_file, usage_file = root / path.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            folder, limit_file, usage_file = root / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        while True:
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit != "max" and int(limit) < 1 << 60:
                    left = max(0, int(limit) - int((folder / usage_file).read_text()))
                    best = left if best is None else min(best, left)
            except (OSError, ValueError):
                pass
            if folder in (root, root / "memory") or folder == folder.parent:
                break
            folder = folder.parent
    return best


class OrtSession:
    """`Session` over an ONNX file on ONNX Runtime."""

    def __init__(self, path: Path, providers=None, threads: int | None = None, options: ort.SessionOptions | None = None,
                 config: dict[str, str] | None = None):
        self.path = Path(path)
        config = {**mapped_weights_config(self.path), **(config or {})}
        self._make = (threads, options, config, providers or ["CPUExecutionProvider"])
        self._sess: ort.InferenceSession | None = None
        self._lock = threading.Lock()  # one thread makes the session again, not each that finds it gone
        self._pool: ort.InferenceSession | None = None  # the pool form's session, once made
        self._pool_lock = threading.Lock()  # two pools made at once share one pool form, made once
        self._inputs = [TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type), tuple(i.shape)) for i in self.sess.get_inputs()]
        self._outputs = [TensorSpec(o.name, _ORT_TYPES.get(o.type, o.type), tuple(o.shape)) for o in self.sess.get_outputs()]
        self.num_layers = sum(1 for s in self._inputs if s.name.endswith(".key"))
        # Optimum's merged decoders take a bool `use_cache_branch` (False for the prompt step): fed here, so
        # the rest of neoxrt sees the plain contract
        self.cache_branch = any(s.name == USE_CACHE_BRANCH for s in self._inputs)
        # the default export takes logits_to_keep, an input with a default (not in get_inputs): a run may ask for
        # the last position's logits only
        self.keeps_logits = io.LOGITS_TO_KEEP in {i.name for i in self.sess.get_overridable_initializers()}

    @property
    def sess(self) -> ort.InferenceSession:
        """The graph as exported (made again on first use after `pool_session` let it go)."""
        with self._lock:
            if self._sess is None:
                threads, options, config, providers = self._make
                self._sess = ort.InferenceSession(str(self.path), session_options(threads, options, config),
                                                  providers=providers)
            return self._sess

    def pool_session(self) -> tuple[ort.InferenceSession, str]:
        """The session the KV-cache pool runs and its form, "gqa" or "export": the graph's pool form
        (`runtime.pool_graph`: attention through GroupQueryAttention, which reads each row's own slots only) where
        it applies, else the graph as exported. With the pool form, the exported graph's session is let go -- the
        weights are not held twice -- and made again if something else runs it (`sess`)."""
        from neoxrt.runtime.pool_graph import gqa_graph

        with self._pool_lock:
            if self._pool is not None:  # a second pool on this session shares the first's
                return self._pool, "gqa"
            graph = gqa_graph(self.path) if not self.cache_branch else None
            if graph is None:
                return self.sess, "export"
            threads, options, config, providers = self._make
            # the rewritten graph comes as bytes: its external weights are found beside model.onnx
            config = {**config, "session.model_external_initializers_file_folder_path": str(self.path.parent)}
            pool = ort.InferenceSession(graph, session_options(threads, options, config), providers=providers)
            with self._lock:
                self._sess, self._pool = None, pool  # decoders made before keep theirs (`_Bound.sess`)
            return pool, "gqa"

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return self._inputs, self._outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._outputs]
        if self.cache_branch and USE_CACHE_BRANCH not in feeds:
            feeds = {**feeds, USE_CACHE_BRANCH: np.array([feeds[io.past_key(0)].shape[2] > 0])}
        return dict(zip(names, self.sess.run(names, feeds)))

    def decoder(self, batch: int, max_total: int) -> OrtBoundDecoder | OrtStaticDecoder:
        if any(s.name == io.WRITE_INDICES for s in self._inputs):
            return OrtStaticDecoder(self, batch, max_total)
        return OrtBoundDecoder(self, batch, max_total)


class _Bound:
    """What both I/O-binding decoders share: cache geometry, logits buffers, binding and the step checks."""

    def __init__(self, session: OrtSession, batch: int, max_total: int):
        spec = {s.name: s for s in session.io_spec()[0]}[io.past_key(0)]
        _, self.heads, _, self.head_dim = spec.shape
        self.dtype = np.dtype(spec.dtype)
        self.session, self.batch, self.max_total, self.past_len = session, batch, max_total, 0
        self.names = [n for i in range(session.num_layers) for n in (io.past_key(i), io.past_value(i))]
        self.logits_spec = next(o for o in session.io_spec()[1] if o.name == io.LOGITS)
        self.vocab = self.logits_spec.shape[-1]
        self.logits: dict[tuple[int, int], np.ndarray] = {}
        self.sess = session.sess  # the session its binding belongs to (kept if `pool_session` lets it go)
        self.binding = self.sess.io_binding()
        self.presents = [n.replace("past_key_values.", "present.") for n in self.names]
        # the binding's C object and the CPU device, looked up once: the Python wrapper builds an OrtDevice on
        # every call (~20 us a tensor, 2 x layers + 4 tensors a step: 0.6 ms of a 1.7 ms 14m step)
        self._io = getattr(self.binding, "_iobinding", None)
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device() if self._io is not None else None

    def _bind(self, name: str, array: np.ndarray, output: bool) -> None:
        self._bind_ptr(name, array.dtype, array.shape, array.ctypes.data, output)

    def _bind_ptr(self, name: str, dtype, shape, pointer: int, output: bool) -> None:
        """Bind `name` to host memory at `pointer` (it must stay alive and unmoved until the run)."""
        if self._io is not None:
            (self._io.bind_output if output else self._io.bind_input)(name, self._cpu, dtype, list(shape), pointer)
        else:  # an ONNX Runtime without the private handle: the public API
            (self.binding.bind_output if output else self.binding.bind_input)(name, "cpu", 0, dtype, list(shape), pointer)

    def _begin(self, input_ids, attention_mask, position_ids, extra: dict | None = None,
               last: bool = False) -> tuple[int, np.ndarray]:
        """Check the step, bind the id inputs (and `extra`); returns (total, logits buffer: [b, 1, V] with `last`,
        the run asking for the last position's logits only)."""
        b, s = input_ids.shape
        total = self.past_len + s
        if b != self.batch or attention_mask.shape != (b, total):
            raise RuntimeShapeError(
                f"decoder expects batch {self.batch} and attention_mask [{self.batch}, {total}], "
                f"got input_ids {list(input_ids.shape)} and attention_mask {list(attention_mask.shape)}"
            )
        if total > self.max_total:
            raise RuntimeShapeError(f"KV cache holds {self.max_total} positions, step needs {total}")
        rows = 1 if last else io.logits_rows(self.logits_spec, s)
        logits = self.logits.get((b, rows))
        if logits is None:  # once for the prompt shape, once for the decode shape
            logits = self.logits[(b, rows)] = np.empty((b, rows, self.vocab), np.float32)
        # every step binds the same names, each new binding replacing the last: nothing to clear
        feeds = {io.INPUT_IDS: np.ascontiguousarray(input_ids, np.int64),
                 io.ATTENTION_MASK: np.ascontiguousarray(attention_mask, np.int64),
                 io.POSITION_IDS: np.ascontiguousarray(position_ids, np.int64), **(extra or {})}
        if self.session.cache_branch:
            feeds[USE_CACHE_BRANCH] = np.array([self.past_len > 0])
        self._feeds = feeds  # bound by pointer: the arrays must outlive the run
        for name, array in feeds.items():
            self._bind(name, array, output=False)
        self._bind(io.LOGITS, logits, output=True)
        return total, logits


class OrtBoundDecoder(_Bound):
    """KV cache in two pre-allocated flat buffers per tensor, bound to ORT by pointer (ping-pong)."""

    def __init__(self, session: OrtSession, batch: int, max_total: int):
        super().__init__(session, batch, max_total)
        size = batch * self.heads * max_total * self.head_dim
        self.buffers = [[np.zeros(size, self.dtype) for _ in self.names] for _ in range(2)]  # [ping|pong][tensor]
        self.pointers = [[b.ctypes.data for b in side] for side in self.buffers]  # a view starts at its buffer's
        self.current = 0

    def _view(self, side: int, j: int, length: int) -> np.ndarray:
        n = self.batch * self.heads * length * self.head_dim
        return self.buffers[side][j][:n].reshape(self.batch, self.heads, length, self.head_dim)

    def step(self, input_ids, attention_mask, position_ids):
        return self.step_all(input_ids, attention_mask, position_ids)[:, -1]

    def step_all(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        """Every position's logits [B, S, V] (the bound buffer: valid until the next step of that shape)."""
        total, logits = self._begin(input_ids, attention_mask, position_ids)
        nxt = 1 - self.current
        past = (self.batch, self.heads, self.past_len, self.head_dim)
        present = (self.batch, self.heads, total, self.head_dim)
        for j, (name, out) in enumerate(zip(self.names, self.presents)):  # _view's memory, by pointer
            self._bind_ptr(name, self.dtype, past, self.pointers[self.current][j], output=False)
            self._bind_ptr(out, self.dtype, present, self.pointers[nxt][j], output=True)
        self.sess.run_with_iobinding(self.binding)
        self.current, self.past_len = nxt, total
        return logits

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions (speculative decoding's rollback): one repack, since the
        buffer's layout [B, H, length, D] depends on the length."""
        if length >= self.past_len:
            return
        other = 1 - self.current
        for j in range(len(self.names)):
            src = self._view(self.current, j, self.past_len)[:, :, :length]
            self._view(other, j, length)[...] = src
        self.current, self.past_len = other, length

    def keep_rows(self, rows: np.ndarray) -> None:
        """Compact the batch to `rows` (one copy of the cache, then every later step is smaller)."""
        rows = np.asarray(rows)
        new_batch = len(rows)
        other = 1 - self.current
        for j in range(len(self.names)):
            src = self._view(self.current, j, self.past_len)[rows]
            n = src.size
            self.buffers[other][j][:n] = src.reshape(-1)
        self.batch, self.current = new_batch, other


class OrtStaticDecoder(_Bound):
    """Static-cache graphs (`--kv-cache static`): one buffer per cache tensor, [B, H, max_total, D], bound as
    both past and present, so TensorScatter writes each step's keys and values in place -- no per-step cache
    copy (ONNX Runtime skips the copy when the two buffers are the same)."""

    def __init__(self, session: OrtSession, batch: int, max_total: int):
        super().__init__(session, batch, max_total)
        self.cache = [np.zeros((batch, self.heads, max_total, self.head_dim), self.dtype) for _ in self.names]
        self.mask = np.zeros((batch, max_total), np.int64)
        self.bound_batch = 0  # the batch the cache tensors are bound for (they do not move between steps)
        # `step` needs the last position only: where the graph takes logits_to_keep, a prompt step skips the LM head
        # for every other position
        self.keeps = session.keeps_logits

    def step(self, input_ids, attention_mask, position_ids):
        return self._step(input_ids, attention_mask, position_ids, self.keeps)[:, -1]

    def truncate(self, length: int) -> None:
        """Rollback: later steps write from slot `length` on; the mask and causality hide what lies beyond."""
        self.past_len = min(self.past_len, length)

    def step_all(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        return self._step(input_ids, attention_mask, position_ids, False)

    def _step(self, input_ids, attention_mask, position_ids, last: bool) -> np.ndarray:
        b = input_ids.shape[0]
        # the graph's mask covers every slot: bind the persistent [B, max_total] mask, fill it once checked
        extra = {io.WRITE_INDICES: np.full(b, self.past_len, np.int64), io.ATTENTION_MASK: self.mask[:b]}
        if self.keeps:
            extra[io.LOGITS_TO_KEEP] = KEEP_FEEDS[last]
        total, logits = self._begin(input_ids, attention_mask, position_ids, extra, last)
        self.mask[:b, :total] = attention_mask
        if self.bound_batch != b:
            for name, out, buf in zip(self.names, self.presents, self.cache):
                self._bind(name, buf[:b], output=False)
                self._bind(out, buf[:b], output=True)
            self.bound_batch = b
        self.sess.run_with_iobinding(self.binding)
        self.past_len = total
        return logits

    def keep_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        for buf in self.cache:
            buf[: len(rows)] = buf[rows]
        self.mask[: len(rows)] = self.mask[rows]
        self.batch = len(rows)
