"""`save_streamed`: write an ONNX model whose weights are (partly) lazy, one tensor at a time.

    model.onnx        graph + small tensors (< 1 KiB) inline: kilobytes to a few MB
    model.onnx.data   every other initializer, in graph order, each at an offset aligned to 64 KiB
                      (ONNX Runtime can memory-map aligned external data; onnx's own writer aligns the same way)

Memory bound: one block of one tensor (`neoxrt.model.weights.BLOCK_BYTES`) plus the graph proto without its
weights; the data file is hashed as it is written, so the manifest costs no second read.
Below `threshold` weight bytes everything stays inline in model.onnx (one file, as small models ship).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from neoxrt import contract as io
from neoxrt.manifest import file_sha256

ALIGN = 64 << 10
INLINE_BYTES = 1024  # tensors smaller than this stay inside model.onnx (as onnx's own writer does)


def initializer_bytes(model: onnx.ModelProto, lazy: dict) -> int:
    """Weight bytes of `model`, lazy tensors counted by shape."""
    return sum(lazy[t.name].nbytes if t.name in lazy else len(t.raw_data) for t in model.graph.initializer)


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _blocks(tensor: TensorProto, lazy: dict):
    if tensor.name in lazy:
        for block in lazy[tensor.name].blocks():
            yield memoryview(np.ascontiguousarray(block)).cast("B")
    else:
        yield memoryview(tensor.raw_data)


def save_streamed(model: onnx.ModelProto, lazy: dict, path: Path, threshold: int) -> dict[str, str]:
    """Save `model` to `path`, materialising `lazy` ({initializer name: lazy array}) tensor by tensor.

    Returns:
        {file name: sha256} of every file written (model.onnx, and model.onnx.data when weights go outside).
    """
    path = Path(path)
    if initializer_bytes(model, lazy) <= threshold:  # small: one self-contained file
        for tensor in model.graph.initializer:
            if tensor.name in lazy:
                tensor.raw_data = np.ascontiguousarray(lazy[tensor.name].numpy()).tobytes()
        onnx.save_model(model, str(path))
        return {path.name: file_sha256(path)}
    offset = 0
    with _Writer(path.parent / io.WEIGHTS_FILE) as data:
        for tensor in model.graph.initializer:
            if tensor.name not in lazy and (len(tensor.raw_data) < INLINE_BYTES or tensor.data_location == TensorProto.EXTERNAL):
                continue
            pad = -offset % ALIGN
            data.put(memoryview(b"\0" * pad))
            start = offset = offset + pad
            for block in _blocks(tensor, lazy):
                data.put(block)
                offset += block.nbytes
            tensor.ClearField("raw_data")
            _set_external(tensor, io.WEIGHTS_FILE, start, offset - start)
    onnx.save_model(model, str(path))
    return {path.name: file_sha256(path), io.WEIGHTS_FILE: data.digest.hexdigest()}


class _Writer:
    """Writes and hashes blocks on a second thread while the caller makes the next one (numpy's copies,
    file writes and sha256 all release the GIL); at most `depth` blocks wait in between."""

    def __init__(self, path: Path, depth: int = 2):
        self.path, self.digest, self.error = path, hashlib.sha256(), None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Writer:
        self.handle = self.path.open("wb")
        self.thread.start()
        return self

    def put(self, block: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(block)

    def _run(self) -> None:
        while (block := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self.handle.write(block)
                    self.digest.update(block)
            except OSError as exc:  # disk full, I/O error: re-raised in the caller
                self.error = exc

    def __exit__(self, *exc) -> None:
        self.queue.put(None)
        self.thread.join()
        self.handle.close()
        if self.error is not None and exc[0] is None:
            raise self.error
