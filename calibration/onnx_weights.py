"""A source artifact's initializers, read lazily: the graph is loaded without its external data and each
weight is a view of `model.onnx.data` (np.memmap of its location/offset/length) or of its inline raw_data.

    graph, weights = open_onnx(folder)       (graph proto without external bytes; nothing else read)
    weights[name].numpy()                    (a read-only view: pages are read when touched)

Memory bound: nothing but the graph proto and the small inline tensors (the export keeps tensors under
1 KiB and models under 256 MiB inline); a weight costs file pages (reclaimable) while it is being used.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from neoxrt import contract as io
from neoxrt.errors import CalibrationError


class MappedTensor:
    """One initializer of the source: shape, dtype, `numpy()` (a view) and `blocks()` (for the writer)."""

    def __init__(self, tensor: TensorProto, folder: Path):
        self.name = tensor.name
        self.shape = tuple(tensor.dims)
        self.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self._tensor, self._where = tensor, None
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            path = (folder / info["location"]).resolve()
            if path.parent != folder.resolve() or not path.is_file():
                raise CalibrationError(f"source weight {tensor.name}: external data {info['location']!r} is not a file "
                                       f"in {folder}")
            self._where = (path, int(info.get("offset", 0)))
            if int(info.get("length", self.nbytes)) != self.nbytes or \
                    path.stat().st_size < self._where[1] + self.nbytes:
                raise CalibrationError(f"source weight {tensor.name}: {self.nbytes} bytes expected at offset "
                                       f"{self._where[1]} of {path.name}, the file is shorter or says otherwise")

    def numpy(self) -> np.ndarray:
        if self._where is None:
            return numpy_helper.to_array(self._tensor)
        path, offset = self._where
        return np.memmap(path, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)

    def blocks(self, block_bytes: int = 64 << 20):
        flat = self.numpy().reshape(-1)
        step = max(1, block_bytes // self.dtype.itemsize)
        for start in range(0, flat.size, step):
            yield np.ascontiguousarray(flat[start: start + step])


class ArrayTensor:
    """An in-memory (small) or computed-on-demand initializer in the writer's lazy interface."""

    def __init__(self, shape: tuple[int, ...], dtype, make):
        self.shape, self.dtype, self._make = tuple(shape), np.dtype(dtype), make
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        out = np.ascontiguousarray(self._make(), self.dtype)
        if out.shape != self.shape:
            raise ValueError(f"made {out.shape}, declared {self.shape}")
        return out

    def blocks(self, block_bytes: int = 64 << 20):
        yield self.numpy()


def open_onnx(folder: Path) -> tuple[onnx.ModelProto, dict[str, MappedTensor]]:
    """The source graph without external bytes, and every initializer as a MappedTensor."""
    folder = Path(folder)
    model = onnx.load(str(folder / io.MODEL_FILE), load_external_data=False)
    return model, {t.name: MappedTensor(t, folder) for t in model.graph.initializer}


def data_less(tensor: TensorProto, shape=None, data_type: int | None = None) -> TensorProto:
    """A copy of `tensor`'s name, dims and type with no data (the writer fills it in)."""
    out = TensorProto(name=tensor.name, data_type=tensor.data_type if data_type is None else data_type,
                      dims=list(tensor.dims if shape is None else shape))
    return out
