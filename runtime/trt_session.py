"""TensorRT backend: a `Session` over an engine artifact (model.engine + manifest.json), and a decoder that
keeps the KV cache on the device.

Cost model of one decode step:
- device buffers allocated once per decoder at its maximum (batch x heads x max_total x head_dim per cache
  tensor, two sides for ping-pong; ids/mask/positions; logits): nothing is allocated per step;
- per step: the profile (prompt when past = 0, else decode) and the input shapes are set, with a
  RuntimeShapeError naming the range when a step falls outside the engine's profiles; ids, mask and
  positions go up (a few bytes), only the last-position logits come back;
- decode steps run from CUDA graphs captured per (batch, past length, side) the first time that shape is
  seen, replayed when it recurs (every later generation of the same lengths).
All TensorRT and CUDA calls go through neoxrt.tensorrt_api (imported lazily). Not run on a GPU yet (see
README); the profile and compatibility logic it relies on is tested on CPU (neoxrt.engine_meta).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.contract import TensorSpec
from neoxrt.engine_meta import ENGINE_FILE, check_engine_compatible, ranges_from_manifest, select_profile
from neoxrt.errors import RuntimeShapeError

MAX_GRAPHS = 4096


class TrtSession:
    """`Session` over a TensorRT engine artifact."""

    def __init__(self, folder: Path, manifest: dict):
        from neoxrt import tensorrt_api as api

        self.api = api
        check_engine_compatible(manifest, api.facts())
        if manifest.get("plugin"):
            api.register_attention_plugin()
        self.engine = api.deserialize((Path(folder) / ENGINE_FILE).read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = api.Stream()
        self.profiles = ranges_from_manifest(manifest["profiles"])
        self.order = list(manifest["profile_order"])
        self._inputs = [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["io"]["inputs"]]
        self._outputs = [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["io"]["outputs"]]
        self.num_layers = sum(1 for s in self._inputs if s.name.endswith(".key"))
        self.profile = None

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return self._inputs, self._outputs

    def use_profile(self, batch: int, sequence: int, past: int) -> None:
        name = select_profile(self.profiles, batch, sequence, past)
        if name != self.profile:
            self.context.set_optimization_profile_async(self.order.index(name), self.stream.handle)
            self.profile = name

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass with host arrays (allocates per call: for checks and reports, not generation)."""
        ids = feeds[io.INPUT_IDS]
        self.use_profile(ids.shape[0], ids.shape[1], feeds[io.past_key(0)].shape[2])
        keep = []
        for spec in self._inputs:
            array = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            buf = self.api.DeviceBuffer(array.nbytes)
            buf.upload(array, self.stream.handle)
            self.context.set_input_shape(spec.name, array.shape)
            self.context.set_tensor_address(spec.name, buf.ptr)
            keep.append(buf)
        results = {}
        for spec in self._outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            host = np.empty(shape, spec.dtype)
            buf = self.api.DeviceBuffer(host.nbytes)
            self.context.set_tensor_address(spec.name, buf.ptr)
            results[spec.name] = (host, buf)
        self.context.execute_async_v3(self.stream.handle)
        for host, buf in results.values():
            buf.download(host, self.stream.handle)
        self.stream.sync()
        return {name: host for name, (host, _) in results.items()}

    def decoder(self, batch: int, max_total: int) -> TrtDecoder:
        return TrtDecoder(self, batch, max_total)


class TrtDecoder:
    """KV cache in device buffers (two sides, ping-pong), decode steps replayed from CUDA graphs."""

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
        self.graphs: dict[tuple[int, int, int], object] = {}

    def step(self, input_ids, attention_mask, position_ids):
        b, s = input_ids.shape
        total = self.past_len + s
        if b != self.batch or attention_mask.shape != (b, total):
            raise RuntimeShapeError(f"decoder expects batch {self.batch} and attention_mask [{self.batch}, {total}], "
                                    f"got input_ids {list(input_ids.shape)} and attention_mask {list(attention_mask.shape)}")
        if total > self.max_total:
            raise RuntimeShapeError(f"KV cache holds {self.max_total} positions, step needs {total}")
        sess, ctx, stream = self.session, self.session.context, self.session.stream.handle
        sess.use_profile(b, s, self.past_len)
        feeds = {io.INPUT_IDS: input_ids, io.ATTENTION_MASK: attention_mask, io.POSITION_IDS: position_ids}
        for name, array in feeds.items():
            array = np.ascontiguousarray(array, np.int64)
            self.ids[name].upload(array, stream)
            ctx.set_input_shape(name, array.shape)
            ctx.set_tensor_address(name, self.ids[name].ptr)
        nxt = 1 - self.current
        for j, name in enumerate(self.names):
            ctx.set_input_shape(name, (b, self.heads, self.past_len, self.head_dim))
            ctx.set_tensor_address(name, self.cache[self.current][j].ptr)
            ctx.set_tensor_address(name.replace("past_key_values.", "present."), self.cache[nxt][j].ptr)
        ctx.set_tensor_address(io.LOGITS, self.logits.ptr)
        key = (b, self.past_len, self.current)
        if s == 1 and key in self.graphs:
            sess.stream.replay(self.graphs[key])
        else:
            ctx.execute_async_v3(stream)
            if s == 1 and len(self.graphs) < MAX_GRAPHS:
                self.graphs[key] = sess.stream.capture(lambda: ctx.execute_async_v3(stream))
        last = np.empty((b, self.vocab), np.float32)
        rows, row = io.logits_rows(self.logits_spec, s), self.vocab * 4
        for r in range(b):  # logits [B, rows, V]: row r's last position
            self.logits.download(last[r], stream, offset=((r * rows) + rows - 1) * row)
        sess.stream.sync()
        self.current, self.past_len = nxt, total
        return last

    def keep_rows(self, rows: np.ndarray) -> None:
        """Compact the batch to `rows`: one device copy per (cache tensor, kept row) into the other side."""
        rt = self.session.api.cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        per_row = self.heads * self.past_len * self.head_dim * self.itemsize
        other, stream = 1 - self.current, self.session.stream.handle
        for j in range(len(self.names)):
            src, dst = self.cache[self.current][j].ptr, self.cache[other][j].ptr
            for new, old in enumerate(np.asarray(rows)):
                self.session.api.check(rt.cudaMemcpyAsync(dst + new * per_row, src + int(old) * per_row, per_row, kind,
                                                          stream), "cudaMemcpyAsync")
        self.batch, self.current = len(rows), other
        self.graphs.clear()
