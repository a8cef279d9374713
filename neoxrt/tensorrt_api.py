"""Every line of neoxrt that touches `tensorrt` (and the CUDA runtime, through cuda-python), imported
lazily: nothing here runs on a machine without TensorRT and an NVIDIA GPU, and nothing else imports
tensorrt. Written against the TensorRT 10.x (>= 10.15) and 11.x Python API:

- strongly typed networks (precision comes from the graph: FP16 export, Q/DQ INT8); the
  NetworkDefinitionCreationFlag.STRONGLY_TYPED flag on 10.x, the default on 11.x;
- named-tensor execution (set_input_shape / set_tensor_address / execute_async_v3);
- IProgressMonitor for build progress, ITimingCache reuse, builder optimisation level,
  hardware/version compatibility.

Every TensorRT call that reports failure by returning False (set_input_shape, set_tensor_address,
execute_async_v3, set_timing_cache, ...) goes through `require`, which raises naming the call and the tensor.
Every name used here is checked against the compiled bindings of the oldest and newest supported TensorRT
in CI (tests/export/test_tensorrt_conformance.py).
"""


import time

from neoxrt.errors import BuildError

MIN_TENSORRT = (10, 15)
# tensorrt.plugin of TensorRT < 11.4 calls int() on 1-element arrays, a TypeError from NumPy 2.4 on
PLUGIN_NUMPY_FIX = (11, 4)


def version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor, ...) of a version string; stops at the first part that is not a number ("2.4.0rc1" -> (2, 4))."""
    parts = []
    for part in str(text).split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def import_tensorrt():
    """The tensorrt module, or a BuildError saying what is missing or too old."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError("TensorRT is not installed (needs an NVIDIA GPU machine: pip install 'neoxrt[gpu]'); "
                         "neoxrt builds engines only there") from None
    if version_tuple(trt.__version__)[:2] < MIN_TENSORRT:
        raise BuildError(f"neoxrt needs TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}, found {trt.__version__}")
    return trt


def require(ok, call: str, error: type = BuildError) -> None:
    """Raise `error` when a TensorRT call that returns a bool returned False: `call` names it and its tensor."""
    if not ok:
        raise error(f"TensorRT {call} failed (see the TensorRT log above)")


def ptx_isa_for_driver(driver_version: int) -> int:
    """The newest PTX ISA (10 * major + minor) a CUDA driver JIT-compiles, from cudaDriverGetVersion's
    1000 * major + 10 * minor (12040 -> 84). The table of the CUDA release notes, as Triton and torch-tensorrt
    use it: 12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5, 12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x, 11.x -> 7.x."""
    major, minor = driver_version // 1000, (driver_version % 1000) // 10
    if major >= 13:
        return 90 + 10 * (major - 13) + minor
    if major == 12:
        return 80 + minor if minor < 6 else 80 + minor - 1
    if major == 11:
        return 70 + minor
    raise BuildError(f"CUDA driver {major}.{minor} is too old for TensorRT (needs CUDA 11 or newer)")


def driver_ptx_isa() -> int:
    """The PTX ISA cap of this machine's CUDA driver (see ptx_isa_for_driver)."""
    return ptx_isa_for_driver(int(check(cudart().cudaDriverGetVersion(), "cudaDriverGetVersion")))


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BuildError("cuda-python is not installed (pip install 'neoxrt[gpu]')") from None
    return runtime


def check(result, what: str):
    """Unwrap a cuda-python (err, *values) tuple."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BuildError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_facts() -> dict:
    """Name and compute capability of GPU 0, or a BuildError when there is none."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise BuildError("no NVIDIA GPU is visible (cudaGetDeviceCount found none); TensorRT engines need one")
    props = check(rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def facts() -> dict:
    trt = import_tensorrt()
    return {"tensorrt": trt.__version__, **gpu_facts()}


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _progress_monitor(trt, log):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.start = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"[{time.perf_counter() - self.start:6.1f}s] {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_serialized_engine(onnx_path: str, profiles: dict, options, log=print) -> tuple[bytes, bytes | None]:
    """Parse `onnx_path`, add `profiles` ({name: {input: [min, opt, max]}}, in order), build.

    Returns:
        (serialized engine, serialized timing cache or None).
    Raises:
        BuildError: TensorRT/GPU missing, the parser refuses the graph (its errors quoted), the build fails.
    """
    trt = import_tensorrt()
    gpu_facts()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if version_tuple(trt.__version__)[0] < 11:  # strongly typed is the default (and only) mode from 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    if options.hardware_compatibility == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.progress_monitor = _progress_monitor(trt, log)
    cache_bytes = b""
    if options.timing_cache and options.timing_cache.is_file():
        cache_bytes = options.timing_cache.read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # made by another GPU or TensorRT
        log(f"timing cache {options.timing_cache} was made by another GPU or TensorRT version: starting a new one")
        cache = config.create_timing_cache(b"")
        require(config.set_timing_cache(cache, ignore_mismatch=False), "set_timing_cache(new cache)")
    for name, shapes in profiles.items():
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes.items():
            profile.set_shape(tensor, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"TensorRT refused optimization profile {name}")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError("TensorRT could not build the engine (see the TensorRT log above)")
    timing = config.get_timing_cache() if options.timing_cache else None
    return bytes(engine), None if timing is None else bytes(timing.serialize())


def deserialize(engine_bytes: bytes, version_compatible: bool = False):
    """The ICudaEngine of a serialized engine. A version-compatible engine embeds the lean runtime (host
    code), which TensorRT runs only when the runtime allows it."""
    trt = import_tensorrt()
    runtime = trt.Runtime(_logger(trt))
    if version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BuildError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
    return engine


class DeviceBuffer:
    """One cudaMalloc'd allocation (freed with the object)."""

    def __init__(self, nbytes: int, zero_with=None):
        self.rt = cudart()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(self.rt.cudaMalloc(self.nbytes), "cudaMalloc"))
        if zero_with is not None:  # a stream: cudaMalloc'd memory is arbitrary bits (NaN patterns included)
            check(self.rt.cudaMemsetAsync(self.ptr, 0, self.nbytes, zero_with), "cudaMemsetAsync")

    def upload(self, array, stream, offset: int = 0) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(self.rt.cudaMemcpyAsync(self.ptr + offset, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync")

    def download(self, array, stream, offset: int = 0) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self.rt.cudaMemcpyAsync(array.ctypes.data, self.ptr + offset, array.nbytes, kind, stream), "cudaMemcpyAsync")

    def __del__(self):
        if getattr(self, "ptr", None):
            self.rt.cudaFree(self.ptr)
            self.ptr = 0


class Stream:
    def __init__(self):
        self.rt = cudart()
        self.handle = check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def sync(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def capture(self, launch):
        """Record `launch()` (which enqueues work on this stream) into an instantiated CUDA graph.

        Thread-local capture mode, as trtexec uses: other threads' CUDA calls are not caught in this capture.
        The capture is always ended, also when `launch` raises; the half-recorded graph is then destroyed.
        """
        rt = self.rt
        check(rt.cudaStreamBeginCapture(self.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        try:
            launch()
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(self.handle)
            if int(err) == 0 and graph:
                rt.cudaGraphDestroy(graph)
            raise
        graph = check(rt.cudaStreamEndCapture(self.handle), "cudaStreamEndCapture")
        try:
            return check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(graph)  # the executable graph is independent of it

    def replay(self, graph_exec) -> None:
        check(self.rt.cudaGraphLaunch(graph_exec, self.handle), "cudaGraphLaunch")

    def destroy(self, graph_exec) -> None:
        check(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")

    def __del__(self):
        if getattr(self, "handle", None) is not None:
            self.rt.cudaStreamDestroy(self.handle)
            self.handle = None


_PLUGIN_TARGET: dict = {}  # what the registered AOT implementation compiles for (set by each build)


def check_plugin_numpy(trt_version: str, numpy_version: str) -> None:
    """Refuse the combination whose tensorrt.plugin crashes creating the plugin (TypeError in _lib.py).

    Raises:
        BuildError: TensorRT < 11.4 with NumPy >= 2.4.
    """
    if version_tuple(trt_version)[:2] < PLUGIN_NUMPY_FIX and version_tuple(numpy_version)[:2] >= (2, 4):
        raise BuildError(f"TensorRT {trt_version}'s tensorrt.plugin fails with NumPy {numpy_version} (fixed in TensorRT "
                         "11.4): pip install 'numpy<2.4' or TensorRT >= 11.4")


def register_attention_plugin(compute_capability: tuple[int, int], ptx_isa: int) -> None:
    """Register `neoxrt::GptNeoxAttention` with TensorRT's Python plugin API (tensorrt.plugin): shapes,
    type combinations and the ahead-of-time implementation -- our Triton kernel compiled to PTX, embedded in
    the engine, launched by TensorRT with grid (B*H, S) and the int32 scalars (S, P). Needed only to build:
    the engine carries the PTX, so running it needs neither this registration nor Triton.

    Args:
        compute_capability: the GPU the PTX is compiled for ((8, 0) for --hardware-compatibility ampere_plus:
            PTX for sm_80 JIT-compiles on every later GPU; sm_90a PTX would not load on Ampere).
        ptx_isa: the newest PTX ISA the driver accepts (driver_ptx_isa()); the PTX's .version is capped to it.
    """
    _PLUGIN_TARGET.update(compute_capability=tuple(compute_capability), ptx_isa=int(ptx_isa))
    if _PLUGIN_TARGET.get("registered"):
        return
    trt = import_tensorrt()
    import numpy

    check_plugin_numpy(trt.__version__, numpy.__version__)
    from typing import List, Tuple, Union

    import tensorrt.plugin as trtp

    from neoxrt.export.neox_onnx import PLUGIN_DOMAIN, PLUGIN_OP
    from neoxrt.export.plugin_kernel import compile_ptx

    plugin_id = f"{PLUGIN_DOMAIN}::{PLUGIN_OP}"

    @trtp.register(plugin_id)
    def _desc(qkv: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, mask: trtp.TensorDesc,
              past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, num_heads: int, head_size: int,
              rotary_dim: int, scale: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        b, s = qkv.shape_expr[0], qkv.shape_expr[1]
        total = past_key.shape_expr[2] + s
        out = trtp.from_shape_expr((b, s, num_heads * head_size), dtype=qkv.dtype)
        present_k = trtp.from_shape_expr((b, num_heads, total, head_size), dtype=past_key.dtype)
        present_v = trtp.from_shape_expr((b, num_heads, total, head_size), dtype=past_value.dtype)
        return out, present_k, present_v

    @trtp.autotune(plugin_id)
    def _tune(qkv, cos, sin, mask, past_key, past_value, outputs) -> List[trtp.AutoTuneCombination]:
        # qkv, cos, sin, mask, past_key, past_value, out, present_key, present_value
        return [trtp.AutoTuneCombination("FP16|FP32, FP32, FP32, INT32, FP16|FP32, FP16|FP32, FP16|FP32, FP16|FP32, "
                                         "FP16|FP32")]

    @trtp.aot_impl(plugin_id)
    def _aot(qkv: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, mask: trtp.TensorDesc,
             past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, num_heads: int, head_size: int, rotary_dim: int,
             scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        dtype = "fp16" if qkv.dtype == trt.float16 else "fp32"
        major, minor = _PLUGIN_TARGET["compute_capability"]
        kernel = compile_ptx(dtype, num_heads, head_size, rotary_dim, scale, target=("cuda", 10 * major + minor),
                             ptx_isa=_PLUGIN_TARGET["ptx_isa"])
        launch = trtp.KernelLaunchParams()
        launch.grid_x = qkv.shape_expr[0] * num_heads
        launch.grid_y = qkv.shape_expr[1]
        launch.block_x = kernel["num_warps"] * 32
        launch.shared_mem = kernel["shared"]
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(qkv.shape_expr[1]), trtp.SymInt32(past_key.shape_expr[2])])
        return kernel["name"].encode(), kernel["ptx"].encode(), launch, scalars

    _PLUGIN_TARGET["registered"] = True
