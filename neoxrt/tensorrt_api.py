"""Every line of neoxrt that touches `tensorrt` (and the CUDA runtime, through cuda-python), imported
lazily: nothing here runs on a machine without TensorRT and an NVIDIA GPU, and nothing else imports
tensorrt. Written against the TensorRT 10.x (>= 10.15) and 11.x Python API:

- strongly typed networks (precision comes from the graph: FP16 export, Q/DQ INT8); the
  NetworkDefinitionCreationFlag.STRONGLY_TYPED flag on 10.x, the default on 11.x;
- named-tensor execution (set_input_shape / set_tensor_address / execute_async_v3);
- IProgressMonitor for build progress, ITimingCache reuse, builder optimisation level,
  hardware/version compatibility.
"""


import time

from neoxrt.errors import BuildError


def import_tensorrt():
    """The tensorrt module, or a BuildError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError("TensorRT is not installed (needs an NVIDIA GPU machine: pip install 'neoxrt[gpu]'); "
                         "neoxrt builds engines only there") from None
    return trt


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
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None and int(trt.__version__.split(".")[0]) < 11:
        flags |= 1 << int(strongly)
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
    config.set_timing_cache(cache, ignore_mismatch=False)
    for name, shapes in profiles.items():
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes.items():
            profile.set_shape(tensor, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"TensorRT refused optimization profile {name}")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError("TensorRT could not build the engine (see the TensorRT log above)")
    timing = config.get_timing_cache().serialize() if options.timing_cache else None
    return bytes(engine), None if timing is None else bytes(timing)


def deserialize(engine_bytes: bytes):
    trt = import_tensorrt()
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BuildError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
    return engine


class DeviceBuffer:
    """One cudaMalloc'd allocation (freed with the object)."""

    def __init__(self, nbytes: int):
        self.rt = cudart()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(self.rt.cudaMalloc(self.nbytes), "cudaMalloc"))

    def upload(self, array, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(self.rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync")

    def download(self, array, stream, offset: int = 0) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self.rt.cudaMemcpyAsync(array.ctypes.data, self.ptr + offset, array.nbytes, kind, stream), "cudaMemcpyAsync")

    def __del__(self):
        if getattr(self, "ptr", None):
            self.rt.cudaFree(self.ptr)


class Stream:
    def __init__(self):
        self.rt = cudart()
        self.handle = check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def sync(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def capture(self, launch):
        """Record `launch()` on this stream into an instantiated CUDA graph."""
        rt = self.rt
        check(rt.cudaStreamBeginCapture(self.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
              "cudaStreamBeginCapture")
        launch()
        graph = check(rt.cudaStreamEndCapture(self.handle), "cudaStreamEndCapture")
        return check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def replay(self, graph_exec) -> None:
        check(self.rt.cudaGraphLaunch(graph_exec, self.handle), "cudaGraphLaunch")


_PLUGIN_REGISTERED = False


def register_attention_plugin() -> None:
    """Register `neoxrt::GptNeoxAttention` with TensorRT's Python plugin API (tensorrt.plugin): shapes,
    type combinations and the ahead-of-time implementation -- our Triton kernel compiled to PTX for this
    GPU, embedded in the engine, launched by TensorRT with grid (B*H, S) and the int32 scalars (S, P)."""
    global _PLUGIN_REGISTERED
    if _PLUGIN_REGISTERED:
        return
    trt = import_tensorrt()
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
        kernel = compile_ptx(dtype, num_heads, head_size, rotary_dim, scale)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = qkv.shape_expr[0] * num_heads
        launch.grid_y = qkv.shape_expr[1]
        launch.block_x = kernel["num_warps"] * 32
        launch.shared_mem = kernel["shared"]
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(qkv.shape_expr[1]), trtp.SymInt32(past_key.shape_expr[2])])
        return kernel["name"].encode(), kernel["ptx"].encode(), launch, scalars

    _PLUGIN_REGISTERED = True
