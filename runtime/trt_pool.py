"""The scheduler's KV-cache pool on a static-cache TensorRT engine: the same slots, rows and prefix cache as
`runtime/kv_pool.py`, in device memory.

    one device buffer per cache tensor, capacity_tokens x heads x head_dim values, allocated (and zeroed) at start
    a run binds rows lo..lo+b-1 as past and present [b, H, W, D] at lo's offset: TensorScatter writes in place
    remove / repack / prefix blocks: device-to-device copies (cudaMemcpy2DAsync, one per cache tensor or block)

Per run only the ids, positions, mask and write indices go up (into device buffers that grow to the largest run
and are kept) and the logits the scheduler reads come back: with `last`, each row's last real token only (any
mix of chunk lengths), else every position. Nothing proportional to the context crosses to the host, and
nothing is allocated per step. A repack goes through one scratch buffer the size of one cache tensor (device
copies may not overlap), so the pool's memory is (capacity + prefix blocks x block + capacity / (2 x layers))
tokens' worth: `pool_for` takes the scratch buffer out of the slots, so the cache, the prefix arena and the
scratch stay within `--kv-cache-memory`; beside them, the input buffers and the logits buffer of the largest run
(its rows x positions x vocabulary x 4 bytes: the engine returns every position's logits).

Runs use the engine's decode profile for one-token steps; a chunk of several tokens takes the verify profile where
the engine has one that holds it (`--verify-tokens K`: 2..K+1 tokens) and the prompt profile otherwise: the static
contract has no past axis (write indices place the tokens), so the prompt profile takes a chunk after a past.
Pool runs execute without CUDA graphs (their rows and widths change as requests come and go).
"""

from __future__ import annotations

import numpy as np

from neoxrt import contract as io
from neoxrt.engine_meta import DECODE
from neoxrt.errors import NeoxrtError
from neoxrt.runtime.kv_pool import PREFIX_SHARE, KVPool, token_bytes
from neoxrt.runtime.trt_session import _copy_2d


def is_static_engine(session) -> bool:
    return bool(getattr(session, "static", False)) and hasattr(session, "api") and hasattr(session, "context")


def engine_slots(session) -> int:
    """The most cache slots a row may have: the engine's decode profile's cache_sequence max."""
    return int(session.profiles[DECODE][io.CACHE_SEQUENCE].max)


def device_free_memory(session) -> int | None:
    """Free device memory in bytes (cudaMemGetInfo), or None where the runtime cannot say."""
    rt = session.api.cudart()
    if not hasattr(rt, "cudaMemGetInfo"):
        return None
    free, _ = session.api.check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free)


DEVICE_SHARE = 0.5  # the default pool: at most this share of the device memory free at start


def default_device_memory(session, max_rows: int, prefix: bool = True) -> int:
    """What `max_rows` rows of the engine's whole cache profile need (with the repack scratch, plus the prefix
    cache's share), but no more than half the free device memory."""
    tensors = 2 * session.num_layers
    need = -(-max_rows * engine_slots(session) * token_bytes(session) * (tensors + DeviceKVPool.SCRATCH_TENSORS) // tensors)
    if prefix:
        need = int(need / (1 - PREFIX_SHARE))
    free = device_free_memory(session)
    return need if free is None else min(need, int(free * DEVICE_SHARE))


class DeviceKVPool(KVPool):
    """`KVPool` over a `TrtSession` of a static-cache engine (see the module docstring)."""

    SCRATCH_TENSORS = 1  # repacks go through one buffer of a cache tensor's size (device copies may not overlap)
    tail_share = 0.0  # not measured on a GPU: the chunk budget exactly
    run_tokens = None  # a run's own cost not measured on a GPU: rows share a run while padding <= the real tokens

    @staticmethod
    def _check(session) -> None:
        if not is_static_engine(session):
            raise NeoxrtError("the device KV-cache pool needs a TensorRT engine of a static-cache export "
                              "(neoxrt export --kv-cache static, then neoxrt build)")

    def _storage(self) -> None:
        api, stream = self.session.api, self.session.stream.handle
        self.itemsize = self.dtype.itemsize
        nbytes = self.capacity * self.heads * self.head_dim * self.itemsize
        self.flat = [api.DeviceBuffer(nbytes, zero_with=stream) for _ in self.names]
        self.scratch = api.DeviceBuffer(nbytes)
        self.keeps = self.ragged_last = self.all_logits  # the engine returns every position; `last` downloads one
        self.inputs = {s.name for s in self.session.io_spec()[0]}
        self._buffers: dict[str, object] = {}

    def _buffer(self, name: str, nbytes: int):
        """The device buffer for `name`, grown (never shrunk) to `nbytes`."""
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[name] = self.session.api.DeviceBuffer(nbytes)
        return buf

    def _row_pitch(self, width: int) -> int:
        return width * self.head_dim * self.itemsize

    def _copy_row(self, dst: int, src: int, n: int) -> None:
        pitch, row = self._row_pitch(self.width), self.heads * self._row_pitch(self.width)
        for buf in self.flat:  # the H blocks of n slots of row src, into row dst's
            _copy_2d(self.session, buf.ptr + dst * row, pitch, buf.ptr + src * row, pitch,
                     n * self.head_dim * self.itemsize, self.heads)

    def _relayout(self, b: int, keep: int, old: int, width: int) -> None:
        block = keep * self.head_dim * self.itemsize
        for buf in self.flat:  # out to the scratch buffer packed, back at the new pitch
            _copy_2d(self.session, self.scratch.ptr, block, buf.ptr, self._row_pitch(old), block, b * self.heads)
            _copy_2d(self.session, buf.ptr, self._row_pitch(width), self.scratch.ptr, block, block, b * self.heads)

    def _new_arena(self, blocks: int, block: int):
        return self.session.api.DeviceBuffer(blocks * len(self.names) * self.heads * block * self.head_dim
                                             * self.itemsize, zero_with=self.session.stream.handle)

    def _block_io(self, arena, slot: int, j: int, start: int, block: int, to_arena: bool) -> None:
        d = self.head_dim * self.itemsize
        pitch = self._row_pitch(self.width)
        for t, buf in enumerate(self.flat):
            cached = arena.ptr + (slot * len(self.names) + t) * self.heads * block * d  # [H, block, D]
            row = buf.ptr + j * self.heads * pitch + start * d  # [H, W, D] from slot start
            if to_arena:
                _copy_2d(self.session, cached, block * d, row, pitch, block * d, self.heads)
            else:
                _copy_2d(self.session, row, pitch, cached, block * d, block * d, self.heads)

    def _execute(self, lo: int, feeds: dict, real: np.ndarray, last: bool) -> np.ndarray:
        sess, stream = self.session, self.session.stream.handle
        b, s = feeds[io.INPUT_IDS].shape
        width = self.width
        past = int(feeds[io.WRITE_INDICES].max())
        sess.use_profile(b, s, past, width)
        sess.bound = None  # the static decoder's CUDA-graph bindings no longer hold
        for name, array in feeds.items():
            if name not in self.inputs:
                continue
            array = np.ascontiguousarray(array, np.int64)
            buf = self._buffer(name, array.nbytes)
            buf.upload(array, stream)
            sess.set_shape(name, array.shape)
            sess.set_address(name, buf.ptr)
        shape = (b, self.heads, width, self.head_dim)
        offset = lo * self.heads * self._row_pitch(width)
        for buf, name, out in zip(self.flat, self.names, self.presents):
            sess.set_shape(name, shape)
            sess.set_address(name, buf.ptr + offset)
            sess.set_address(out, buf.ptr + offset)
        rows = io.logits_rows(self.logits_spec, s)
        logits = self._buffer(io.LOGITS, b * rows * self.vocab * 4)
        sess.set_address(io.LOGITS, logits.ptr)
        sess.execute()
        if rows > 1 and last:  # each row's last real position
            out = np.empty((b, 1, self.vocab), np.float32)
            for j in range(b):
                logits.download(out[j], stream, offset=(j * rows + max(int(real[j]), 1) - 1) * self.vocab * 4)
        else:
            out = np.empty((b, rows, self.vocab), np.float32)
            logits.download(out, stream)
        sess.stream.sync()
        return out

    def read(self, t: int) -> np.ndarray:
        """Cache tensor `t` of the live rows, [B, H, W, D], copied to the host (tests)."""
        out = np.empty((len(self.rows), self.heads, self.width, self.head_dim), self.dtype)
        if out.size:
            self.flat[t].download(out, self.session.stream.handle)
        self.session.stream.sync()
        return out

    def write(self, t: int, values: np.ndarray) -> None:
        """Cache tensor `t` of the live rows set to `values` [B, H, W, D] (tests)."""
        self.flat[t].upload(np.ascontiguousarray(values, self.dtype), self.session.stream.handle)
