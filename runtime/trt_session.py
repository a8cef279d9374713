"""TensorRT backend: a `Session` over an engine artifact (model.engine + manifest.json), and decoders that
keep the KV cache on the device.

Two engine contracts, as exported:
- dynamic cache (past [B,H,P,D] in, present [B,H,P+1,D] out): the shapes change every step, so every step
  is one execute_async_v3 (no CUDA graph: a graph of one step would never be replayed). Two cache sides,
  ping-pong, allocated once per decoder.
- static cache (`--kv-cache static`: past and present [B,H,C,D] bound to one buffer, TensorScatter writes
  the step's keys and values in place at `write_indices`): a decode step has the same shapes and addresses
  every time, so it runs from a CUDA graph -- one per (batch, cache slots C), captured the first time, then
  replayed every later step and generation, destroyed with the session (`close`). C is the generation's
  length rounded up to a power of two (at least 64, at most the engine's), so the graphs stay few. The cache,
  id, mask and decode-logits buffers belong to the session (fixed addresses, zeroed once); prompt steps run
  without a graph.
Per step only the ids, positions, mask (and write index) go up and the last-position logits come back.

Speculative decoding (engines built with `--verify-tokens K`, profile `verify`): `step_all` runs K + 1 tokens
after a past and returns every position's logits; `truncate(length)` rolls the cache back -- static cache:
the write position moves back (what lies beyond is masked); dynamic cache: one strided device copy per cache
tensor into the other side (the layout [B, H, P, D] depends on P). Verify steps run without a CUDA graph.

Every TensorRT call that returns a bool is checked, naming the call and the tensor
(`neoxrt.tensorrt_api.require`). This module imports neither the export stage nor Triton: plugin engines
carry their kernel (ahead-of-time PTX), so a runtime-only install (`neoxrt[gpu]`) runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.contract import TensorSpec
from neoxrt.engine_meta import DECODE, ENGINE_FILE, VERIFY, check_engine_compatible, ranges_from_manifest, select_profile
from neoxrt.errors import RuntimeShapeError

MIN_SLOTS = 64


def cache_slots(needed: int, most: int) -> int:
    """Static-cache slots for a generation of `needed` positions: the next power of two (>= MIN_SLOTS), at
    most `most` (the engine's largest cache)."""
    if needed > most:
        raise RuntimeShapeError(f"engine holds at most {most} cache positions, generation needs {needed}")
    return min(most, max(MIN_SLOTS, 1 << max(needed - 1, 0).bit_length()))


class TrtSession:
    """`Session` over a TensorRT engine artifact. `api` defaults to neoxrt.tensorrt_api (tests pass a stand-in)."""

    def __init__(self, folder: Path, manifest: dict, api=None):
        if api is None:
            from neoxrt import tensorrt_api as api
        self.api = api
        check_engine_compatible(manifest, api.facts())
        version_compatible = bool(manifest.get("build_options", {}).get("version_compatible"))
        self.engine = api.deserialize((Path(folder) / ENGINE_FILE).read_bytes(), version_compatible)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeShapeError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = api.Stream()
        self.profiles = ranges_from_manifest(manifest["profiles"])
        self.order = list(manifest["profile_order"])
        self._inputs = [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["io"]["inputs"]]
        self._outputs = [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["io"]["outputs"]]
        self.num_layers = sum(1 for s in self._inputs if s.name.endswith(".key"))
        self.static = any(s.name == io.WRITE_INDICES for s in self._inputs)
        # the most guessed tokens one verify step takes (0: built without --verify-tokens)
        self.verify_tokens = self.profiles[VERIFY][io.SEQUENCE].max - 1 if VERIFY in self.profiles else 0
        self.profile = None
        self.graphs: dict[tuple[int, int], object] = {}  # static cache: (batch, slots) -> CUDA graph
        self.bound = None  # the (batch, slots) whose decode shapes and addresses the context holds
        self.buffers: StaticBuffers | None = None

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return self._inputs, self._outputs

    # -- checked TensorRT calls -------------------------------------------------------------------------
    def set_shape(self, name: str, shape) -> None:
        shape = tuple(int(d) for d in shape)
        self.api.require(self.context.set_input_shape(name, shape), f"set_input_shape({name}, {list(shape)})",
                         RuntimeShapeError)

    def set_address(self, name: str, ptr: int) -> None:
        self.api.require(self.context.set_tensor_address(name, int(ptr)), f"set_tensor_address({name})")

    def execute(self) -> None:
        self.api.require(self.context.execute_async_v3(self.stream.handle), "execute_async_v3")

    def use_profile(self, batch: int, sequence: int, past: int, cache: int | None = None) -> None:
        name = select_profile(self.profiles, batch, sequence, past, cache)
        if name != self.profile:
            self.api.require(self.context.set_optimization_profile_async(self.order.index(name), self.stream.handle),
                             f"set_optimization_profile_async({name})")
            self.profile, self.bound = name, None

    # -- one pass with host arrays ------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass with host arrays (allocates per call: for checks and reports, not generation)."""
        ids = feeds[io.INPUT_IDS]
        if self.num_layers == 0:  # a head graph: batch x sequence, one profile
            self.use_profile(ids.shape[0], ids.shape[1], 0)
        else:
            cache = feeds[io.past_key(0)].shape[2]
            past = int(np.max(feeds[io.WRITE_INDICES])) if self.static else cache
            self.use_profile(ids.shape[0], ids.shape[1], past, cache if self.static else None)
        self.bound = None
        keep = []
        for spec in self._inputs:
            array = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            buf = self.api.DeviceBuffer(array.nbytes)
            buf.upload(array, self.stream.handle)
            self.set_shape(spec.name, array.shape)
            self.set_address(spec.name, buf.ptr)
            keep.append(buf)
        results = {}
        for spec in self._outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            host = np.empty(shape, spec.dtype)
            buf = self.api.DeviceBuffer(host.nbytes)
            self.set_address(spec.name, buf.ptr)
            results[spec.name] = (host, buf)
        self.execute()
        for host, buf in results.values():
            buf.download(host, self.stream.handle)
        self.stream.sync()
        return {name: host for name, (host, _) in results.items()}

    def decoder(self, batch: int, max_total: int) -> TrtDecoder | TrtStaticDecoder:
        if self.static:
            return TrtStaticDecoder(self, batch, max_total)
        return TrtDecoder(self, batch, max_total)

    # -- static cache: session-owned buffers and graphs -------------------------------------------------
    def static_buffers(self, batch: int) -> StaticBuffers:
        """The session's static-cache buffers, for at least `batch` rows (growing them drops the graphs,
        which point into the old ones)."""
        if self.buffers is None or self.buffers.batch < batch:
            self.close()
            self.buffers = StaticBuffers(self, batch, self.profiles[DECODE][io.CACHE_SEQUENCE].max)
        return self.buffers

    def bind_static(self, batch: int, sequence: int, slots: int, logits_ptr: int) -> None:
        """Shapes and addresses of a static-cache step: cache [batch, H, slots, D] as past and present."""
        bufs = self.buffers
        for name, buf, shape in ((io.INPUT_IDS, bufs.ids, (batch, sequence)), (io.POSITION_IDS, bufs.pos, (batch, sequence)),
                                 (io.ATTENTION_MASK, bufs.mask, (batch, slots)), (io.WRITE_INDICES, bufs.write, (batch,))):
            self.set_shape(name, shape)
            self.set_address(name, buf.ptr)
        for name, buf in zip(bufs.names, bufs.cache):
            self.set_shape(name, (batch, bufs.heads, slots, bufs.head_dim))
            self.set_address(name, buf.ptr)
            self.set_address(name.replace("past_key_values.", "present."), buf.ptr)
        self.set_address(io.LOGITS, logits_ptr)

    def close(self) -> None:
        """Destroy the CUDA graphs (they hold the session's buffers' addresses)."""
        graphs, self.graphs, self.bound = self.graphs, {}, None
        for graph in graphs.values():
            self.stream.destroy(graph)

    def __del__(self):
        if getattr(self, "graphs", None):
            self.close()


class TrtDecoder:
    """Dynamic-cache engines: KV cache in device buffers (two sides, ping-pong), one execute per step."""

    def __init__(self, session: TrtSession, batch: int, max_total: int):
        api = session.api
        spec = {s.name: s for s in session.io_spec()[0]}[io.past_key(0)]
        _, self.heads, _, self.head_dim = spec.shape
        self.itemsize = np.dtype(spec.dtype).itemsize
        self.session, self.batch, self.max_total, self.past_len, self.current = session, batch, max_total, 0, 0
        self.names = [n for i in range(session.num_layers) for n in (io.past_key(i), io.past_value(i))]
        cache_bytes = batch * self.heads * max_total * self.head_dim * self.itemsize
        self.cache = [[api.DeviceBuffer(cache_bytes) for _ in self.names] for _ in range(2)]
        self.ids = {n: api.DeviceBuffer(batch * max_total * 8) for n in (io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS)}
        self.logits_spec = next(o for o in session.io_spec()[1] if o.name == io.LOGITS)
        self.vocab = self.logits_spec.shape[-1]
        self.logits = api.DeviceBuffer(batch * max_total * self.vocab * 4)

    def step(self, input_ids, attention_mask, position_ids):
        b, s = self._run(input_ids, attention_mask, position_ids)
        return _last_logits(self.logits, self.logits_spec, b, s, self.vocab, self.session.stream)

    def step_all(self, input_ids, attention_mask, position_ids):
        """Every position's logits [B, S, V] (speculative decoding's verify step)."""
        b, s = self._run(input_ids, attention_mask, position_ids)
        return _all_logits(self.logits, self.logits_spec, b, s, self.vocab, self.session.stream)

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions: per cache tensor one strided copy ([B*H] rows of length*D
        of the P*D) into the other side."""
        if length >= self.past_len:
            return
        row, pitch = length * self.head_dim * self.itemsize, self.past_len * self.head_dim * self.itemsize
        other = 1 - self.current
        for j in range(len(self.names)):
            _copy_2d(self.session, self.cache[other][j].ptr, row, self.cache[self.current][j].ptr, pitch, row,
                     self.batch * self.heads)
        self.current, self.past_len = other, length

    def _run(self, input_ids, attention_mask, position_ids) -> tuple[int, int]:
        b, s = input_ids.shape
        total = _check_step(self, input_ids, attention_mask)
        sess, stream = self.session, self.session.stream.handle
        sess.use_profile(b, s, self.past_len)
        feeds = {io.INPUT_IDS: input_ids, io.ATTENTION_MASK: attention_mask, io.POSITION_IDS: position_ids}
        for name, array in feeds.items():
            array = np.ascontiguousarray(array, np.int64)
            self.ids[name].upload(array, stream)
            sess.set_shape(name, array.shape)
            sess.set_address(name, self.ids[name].ptr)
        nxt = 1 - self.current
        for j, name in enumerate(self.names):
            sess.set_shape(name, (b, self.heads, self.past_len, self.head_dim))
            sess.set_address(name, self.cache[self.current][j].ptr)
            sess.set_address(name.replace("past_key_values.", "present."), self.cache[nxt][j].ptr)
        sess.set_address(io.LOGITS, self.logits.ptr)
        sess.execute()
        self.current, self.past_len = nxt, total
        return b, s

    def keep_rows(self, rows: np.ndarray) -> None:
        """Compact the batch to `rows`: one device copy per (cache tensor, kept row) into the other side."""
        per_row = self.heads * self.past_len * self.head_dim * self.itemsize
        other = 1 - self.current
        for j in range(len(self.names)):
            _copy_rows(self.session, self.cache[self.current][j].ptr, self.cache[other][j].ptr, rows, per_row)
        self.batch, self.current = len(rows), other


class StaticBuffers:
    """Device buffers of static-cache steps, owned by the session so that CUDA graphs can keep their
    addresses: per cache tensor [batch, H, most, D] (zeroed once: unwritten slots are masked, and must not
    hold NaN bit patterns), ids / positions / mask [batch, most] int64, write indices [batch], decode
    logits [batch, 1, V] fp32."""

    def __init__(self, session: TrtSession, batch: int, most: int):
        api, stream = session.api, session.stream.handle
        spec = {s.name: s for s in session.io_spec()[0]}[io.past_key(0)]
        _, self.heads, _, self.head_dim = spec.shape
        self.itemsize = np.dtype(spec.dtype).itemsize
        self.batch, self.most = batch, most
        self.names = [n for i in range(session.num_layers) for n in (io.past_key(i), io.past_value(i))]
        self.cache = [api.DeviceBuffer(batch * self.heads * most * self.head_dim * self.itemsize, zero_with=stream)
                      for _ in self.names]
        self.ids, self.pos, self.mask = (api.DeviceBuffer(batch * most * 8) for _ in range(3))
        self.write = api.DeviceBuffer(batch * 8)
        vocab = next(o for o in session.io_spec()[1] if o.name == io.LOGITS).shape[-1]
        self.logits = api.DeviceBuffer(batch * vocab * 4)


class TrtStaticDecoder:
    """Static-cache engines: the cache is written in place; decode steps replay the session's CUDA graph for
    (batch, slots), captured at the first decode step of that shape."""

    def __init__(self, session: TrtSession, batch: int, max_total: int):
        self.session, self.batch, self.max_total, self.past_len = session, batch, max_total, 0
        self.slots = cache_slots(max_total, session.profiles[DECODE][io.CACHE_SEQUENCE].max)
        self.buffers = session.static_buffers(batch)
        self.mask = np.zeros((batch, self.slots), np.int64)
        self.logits_spec = next(o for o in session.io_spec()[1] if o.name == io.LOGITS)
        self.vocab = self.logits_spec.shape[-1]
        self.step_logits: dict[tuple[int, int], object] = {}  # (batch, rows) -> logits buffer of graph-less steps

    def step(self, input_ids, attention_mask, position_ids):
        logits, b, s = self._run(input_ids, attention_mask, position_ids)
        return _last_logits(logits, self.logits_spec, b, s, self.vocab, self.session.stream)

    def step_all(self, input_ids, attention_mask, position_ids):
        """Every position's logits [B, S, V] (speculative decoding's verify step: the `verify` profile)."""
        logits, b, s = self._run(input_ids, attention_mask, position_ids)
        return _all_logits(logits, self.logits_spec, b, s, self.vocab, self.session.stream)

    def truncate(self, length: int) -> None:
        """Rollback: later steps write from slot `length` on; the mask and causality hide what lies beyond."""
        self.past_len = min(self.past_len, length)

    def _run(self, input_ids, attention_mask, position_ids):
        b, s = input_ids.shape
        total = _check_step(self, input_ids, attention_mask)
        sess, bufs, stream = self.session, self.buffers, self.session.stream.handle
        self.mask[:b, :total] = attention_mask
        bufs.ids.upload(np.ascontiguousarray(input_ids, np.int64), stream)
        bufs.pos.upload(np.ascontiguousarray(position_ids, np.int64), stream)
        bufs.mask.upload(self.mask[:b], stream)
        bufs.write.upload(np.full(b, self.past_len, np.int64), stream)
        if s == 1 and self.past_len > 0:
            self._decode(b)
            logits = bufs.logits
        else:  # prompt or verify step: its own shapes, no graph
            sess.use_profile(b, s, self.past_len, self.slots)
            rows = io.logits_rows(self.logits_spec, s)
            logits = self.step_logits.get((b, rows))
            if logits is None:
                logits = self.step_logits[(b, rows)] = sess.api.DeviceBuffer(b * rows * self.vocab * 4)
            sess.bind_static(b, s, self.slots, logits.ptr)
            sess.bound = None
            sess.execute()
        self.past_len = total
        return logits, b, s

    def _decode(self, b: int) -> None:
        sess, key = self.session, (b, self.slots)
        if sess.bound != key:
            sess.use_profile(b, 1, self.past_len, self.slots)
            sess.bind_static(b, 1, self.slots, self.buffers.logits.ptr)
            sess.bound = key
        graph = sess.graphs.get(key)
        if graph is not None:
            sess.stream.replay(graph)
            return
        # first decode step of this shape: run it (TensorRT's first enqueue at new shapes does set-up work
        # that must stay outside a capture), then record the same enqueue for every later step
        sess.execute()
        sess.graphs[key] = sess.stream.capture(sess.execute)

    def keep_rows(self, rows: np.ndarray) -> None:
        """Compact the batch to `rows` in place (row r moves to index j <= r, so no row is overwritten before
        it is read)."""
        rows = np.asarray(rows)
        bufs = self.buffers
        per_row = bufs.heads * self.slots * bufs.head_dim * bufs.itemsize
        for buf in bufs.cache:
            _copy_rows(self.session, buf.ptr, buf.ptr, rows, per_row)
        self.mask[: len(rows)] = self.mask[rows]
        self.batch = len(rows)


def _check_step(decoder, input_ids, attention_mask) -> int:
    b, s = input_ids.shape
    total = decoder.past_len + s
    if b != decoder.batch or attention_mask.shape != (b, total):
        raise RuntimeShapeError(f"decoder expects batch {decoder.batch} and attention_mask [{decoder.batch}, {total}], "
                                f"got input_ids {list(input_ids.shape)} and attention_mask {list(attention_mask.shape)}")
    if total > decoder.max_total:
        raise RuntimeShapeError(f"KV cache holds {decoder.max_total} positions, step needs {total}")
    return total


def _last_logits(buf, spec: TensorSpec, b: int, s: int, vocab: int, stream) -> np.ndarray:
    """Row r's last-position logits of the [B, rows, V] fp32 buffer, downloaded; waits for the stream."""
    last = np.empty((b, vocab), np.float32)
    rows, row = io.logits_rows(spec, s), vocab * 4
    for r in range(b):
        buf.download(last[r], stream.handle, offset=((r * rows) + rows - 1) * row)
    stream.sync()
    return last


def _all_logits(buf, spec: TensorSpec, b: int, s: int, vocab: int, stream) -> np.ndarray:
    """The [B, rows, V] fp32 buffer, downloaded; waits for the stream."""
    out = np.empty((b, io.logits_rows(spec, s), vocab), np.float32)
    buf.download(out, stream.handle)
    stream.sync()
    return out


def _copy_2d(session: TrtSession, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
    """Device copy of `height` rows of `width` bytes, rows `spitch` apart at src and `dpitch` apart at dst."""
    api = session.api
    rt = api.cudart()
    api.check(rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                   session.stream.handle), "cudaMemcpy2DAsync")


def _copy_rows(session: TrtSession, src: int, dst: int, rows, per_row: int) -> None:
    """Device copy of row blocks rows[j] -> j (skipping rows already in place)."""
    api = session.api
    rt = api.cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    for new, old in enumerate(np.asarray(rows)):
        if src != dst or new != int(old):
            api.check(rt.cudaMemcpyAsync(dst + new * per_row, src + int(old) * per_row, per_row, kind,
                                         session.stream.handle), "cudaMemcpyAsync")
