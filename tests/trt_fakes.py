"""A stand-in for TensorRT and the CUDA runtime, for testing neoxrt's TensorRT runtime on CPU.

`FakeApi` replaces `neoxrt.tensorrt_api` for `TrtSession(folder, manifest, api=FakeApi(...))`:
- device memory is host memory; a fresh allocation holds 0xFF bytes (NaN in fp16 and fp32, as stale GPU
  memory may), so a buffer that must be zeroed and is not shows up as NaN logits;
- the "engine" is the artifact's ONNX graph on ONNX Runtime: `execute_async_v3` reads every input from the
  address and shape bound for it, runs the graph and writes every output to its bound address (an output
  bound to its input's address is updated in place, as TensorScatter does);
- `set_input_shape` returns False outside the engine's profile (or for a tensor named in `refuse`),
  `execute_async_v3` returns False when `fail_execute` is set -- the bools TensorRT returns;
- stream capture records the enqueue with the shapes and addresses bound at that moment, replay runs that
  record; every capture, replay and destroy is counted.
Imports no onnx, torch or triton (a runtime-only install test runs it with those blocked).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

from neoxrt import contract as io
from neoxrt import tensorrt_api
from neoxrt.engine_meta import ENGINE_FILE, input_shapes, ranges_from_manifest

ENGINE = {"tensorrt": "10.15.1", "gpu": "stand-in", "compute_capability": "9.0"}


def engine_artifact(src: Path, folder: Path, **options) -> tuple[Path, dict]:
    """An engine artifact folder of the export/calibrate artifact `src` (manifest as neoxrt build writes it,
    profiles from `BuildOptions(**options)`; the engine file a placeholder) and its manifest."""
    from neoxrt.export.engine import BuildOptions, engine_profiles  # not at import: runtime-only tests block it

    source = json.loads((Path(src) / io.MANIFEST_FILE).read_text())
    build = BuildOptions(**{"max_batch": 4, "max_context": 256, **options})
    axes, _ = engine_profiles(source, build)
    manifest = {k: source[k] for k in ("config", "io", "export_options", "task", "id2label") if k in source}
    manifest.update(files={k: v for k, v in source["files"].items() if k in io.COMPANION_FILES},  # copied by the build
                    stage="build", profiles=axes, profile_order=list(axes), engine=dict(ENGINE),
                    build_options=build.for_model(source["config"]["max_position_embeddings"]).to_dict())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ENGINE_FILE).write_bytes(b"placeholder")
    return folder, manifest


class Memory:
    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 1 << 20

    def alloc(self, nbytes: int) -> int:
        ptr, self.next = self.next, self.next + ((nbytes + 4095) // 4096 + 1) * 4096
        self.blocks[ptr] = np.full(nbytes, 0xFF, np.uint8)
        return ptr

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, block in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + block.size:
                return block[ptr - base: ptr - base + nbytes]
        raise AssertionError(f"access of {nbytes} bytes at {ptr:#x} outside every allocation")

    def free(self, ptr: int) -> None:
        self.blocks.pop(ptr, None)


class FakeCudart:
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyDeviceToDevice=3)

    def __init__(self, memory: Memory):
        self.memory, self.copies_2d = memory, 0
        self.free = 1 << 34  # what cudaMemGetInfo reports free

    def cudaMemGetInfo(self):
        return (0, self.free, 1 << 35)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        data = self.memory.view(src, nbytes).copy()
        self.memory.view(dst, nbytes)[:] = data
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert width <= dpitch and width <= spitch, (width, dpitch, spitch)
        rows = [self.memory.view(src + r * spitch, width).copy() for r in range(height)]
        assert not (src < dst + (height - 1) * dpitch + width and dst < src + (height - 1) * spitch + width), \
            "cudaMemcpy2DAsync areas may not overlap"
        for r, data in enumerate(rows):
            self.memory.view(dst + r * dpitch, width)[:] = data
        self.copies_2d += 1
        return (0,)


class FakeContext:
    def __init__(self, api: FakeApi):
        self.api, self.shapes, self.addresses, self.profile = api, {}, {}, None
        self.inputs = {t["name"]: t for t in api.manifest["io"]["inputs"]}
        self.outputs = {t["name"]: t for t in api.manifest["io"]["outputs"]}
        ranges = ranges_from_manifest(api.manifest["profiles"])
        self.limits = input_shapes(ranges, api.manifest["io"]["inputs"])

    def set_optimization_profile_async(self, index, stream):
        self.profile = self.api.manifest["profile_order"][index]
        return True

    def set_input_shape(self, name, shape):
        if name not in self.inputs or name in self.api.refuse or self.profile is None:
            return False
        lo, _, hi = self.limits[self.profile][name]
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self.inputs and name not in self.outputs:
            return False
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name):
        """An output's shape: its named axes take the values the bound inputs give them."""
        axes = {}
        for spec in self.inputs.values():
            for axis, value in zip(spec["shape"], self.shapes[spec["name"]]):
                if isinstance(axis, str):
                    axes[axis] = value
        return tuple(axes[d] if isinstance(d, str) else int(d) for d in self.outputs[name]["shape"])

    def execute_async_v3(self, stream):
        if self.api.fail_execute:
            return False
        record = (dict(self.shapes), dict(self.addresses))
        self.api.steps.append((self.profile, record[0]))
        if self.api.capturing:
            self.api.recorded.append(record)
        else:
            self.api.run(record)
        return True


class FakeStream:
    def __init__(self, api: FakeApi):
        self.api, self.handle = api, 7

    def sync(self):
        pass

    def capture(self, launch):
        self.api.capturing, start = True, len(self.api.recorded)
        try:
            launch()
        finally:
            self.api.capturing = False
        self.api.counts["capture"] += 1
        graph = len(self.api.graphs)
        self.api.graphs.append(self.api.recorded[start:])
        return graph

    def replay(self, graph):
        assert graph not in self.api.destroyed, "replay of a destroyed graph"
        self.api.counts["replay"] += 1
        for record in self.api.graphs[graph]:
            self.api.run(record)

    def destroy(self, graph):
        self.api.destroyed.add(graph)


class FakeApi:
    """neoxrt.tensorrt_api's surface, over the ONNX graph at `onnx_path` and the engine `manifest`."""

    require = staticmethod(tensorrt_api.require)
    check = staticmethod(tensorrt_api.check)

    def __init__(self, onnx_path, manifest: dict, refuse=()):
        self.manifest, self.refuse, self.fail_execute = manifest, set(refuse), False
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.memory = Memory()
        self.capturing, self.recorded, self.graphs, self.destroyed = False, [], [], set()
        self.counts = {"capture": 0, "replay": 0, "execute": 0}
        self.steps: list[tuple[str, dict]] = []  # (profile, input shapes) of every enqueue, in order
        self.deserialized_with = None
        api = self

        class DeviceBuffer:
            def __init__(self, nbytes, zero_with=None):
                self.nbytes = max(int(nbytes), 1)
                self.ptr = api.memory.alloc(self.nbytes)
                if zero_with is not None:
                    api.memory.view(self.ptr, self.nbytes)[:] = 0

            def upload(self, array, stream, offset=0):
                api.memory.view(self.ptr + offset, array.nbytes)[:] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)

            def download(self, array, stream, offset=0):
                array.view(np.uint8).reshape(-1)[:] = api.memory.view(self.ptr + offset, array.nbytes)

        self.DeviceBuffer = DeviceBuffer
        self._cudart = FakeCudart(self.memory)

    def facts(self):
        return dict(self.manifest["engine"])

    def cudart(self):
        return self._cudart

    def Stream(self):  # noqa: N802 -- the class name it stands in for
        return FakeStream(self)

    def deserialize(self, data, version_compatible=False):
        self.deserialized_with = version_compatible
        return SimpleNamespace(create_execution_context=lambda: FakeContext(self))

    def run(self, record):
        shapes, addresses = record
        self.counts["execute"] += 1
        specs = {t["name"]: t for t in self.manifest["io"]["inputs"]}
        feeds = {}
        for name, spec in specs.items():
            dtype = np.dtype(spec["dtype"])
            n = int(np.prod(shapes[name])) * dtype.itemsize
            feeds[name] = self.memory.view(addresses[name], n).view(dtype).reshape(shapes[name]).copy()
        names = [o.name for o in self.session.get_outputs()]
        for name, value in zip(names, self.session.run(names, feeds)):
            value = np.ascontiguousarray(value)
            self.memory.view(addresses[name], value.nbytes)[:] = value.view(np.uint8).reshape(-1)
