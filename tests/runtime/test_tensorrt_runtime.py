"""The TensorRT runtime's logic on CPU, against a stand-in for TensorRT and CUDA (tests/trt_fakes.py) whose
"engine" is the artifact's ONNX graph on ONNX Runtime: what the session binds (shapes, addresses, the static
cache buffers, write indices, the mask over the slots) must give the tokens ONNX Runtime's own decoders give.
Also: static-cache decode steps replay one CUDA graph per (batch, slots), captured once and destroyed with
the session; dynamic-cache engines run without graphs; every refused TensorRT call raises naming the tensor;
a capture is always ended; the runtime needs neither the export stage nor onnx, torch or triton."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from neox_testing import PROMPTS, default_checkpoint
from neoxrt import contract as io
from neoxrt import tensorrt_api
from neoxrt.errors import BuildError, RuntimeShapeError
from neoxrt.export.engine import BuildOptions
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.trt_session import TrtSession, TrtStaticDecoder, cache_slots
from trt_fakes import FakeApi, engine_artifact

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-runtime")
    out = {}
    for name, options in {"static": ExportOptions(kv_cache="static"),
                          "dynamic": ExportOptions(logits="last", kv_cache="dynamic")}.items():
        export_checkpoint(default_checkpoint(), root / name, options, **QUIET)
        out[name] = root / name
    return out


def session_for(exports, kind, tmp_path, **options):
    folder, manifest = engine_artifact(exports[kind], tmp_path / f"engine-{kind}", **options)
    api = FakeApi(exports[kind] / io.MODEL_FILE, manifest)
    return TrtSession(folder, manifest, api=api), manifest, api


def test_static_engine_replays_one_graph_per_batch_and_matches_onnx_runtime(exports, tmp_path):
    session, manifest, api = session_for(exports, "static", tmp_path)
    ours = Generator(session, manifest)
    want = Generator.from_artifacts(exports["static"]).generate(PROMPTS, max_new_tokens=8, ignore_eos=True).ids
    assert ours.generate(PROMPTS, max_new_tokens=8, ignore_eos=True).ids == want
    # prompt (no graph), first decode step executed then captured, the other 6 replayed
    assert list(session.graphs) == [(3, 64)] and api.counts["capture"] == 1 and api.counts["replay"] == 6
    assert ours.generate(PROMPTS, max_new_tokens=8, ignore_eos=True).ids == want  # the same graph, every step
    assert api.counts["capture"] == 1 and api.counts["replay"] == 13
    one = Generator.from_artifacts(exports["static"]).generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True).ids
    assert ours.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True).ids == one  # batch 1: a graph of its own
    assert set(session.graphs) == {(3, 64), (1, 64)} and api.counts["capture"] == 2
    session.close()
    assert not session.graphs and api.destroyed == {0, 1}


def test_jump_forward_on_the_static_engine(exports, tmp_path):
    """A schema's forced tokens go into one engine step with the token before them (the prompt profile takes a
    step of several tokens after a past): fewer steps than tokens, and ONNX Runtime's ids."""
    session, manifest, api = session_for(exports, "static", tmp_path)
    reference = Generator.from_artifacts(exports["static"])
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    options = dict(max_new_tokens=40, structured_outputs={"json": schema})
    want = reference.generate(["We are"], **options)
    got = Generator(session, manifest, reference.tokenizer).generate(["We are"], **options)
    assert got.ids == want.ids
    prompt_profile = [shapes[io.INPUT_IDS] for profile, shapes in api.steps if profile == "prompt"]
    assert len(prompt_profile) >= 2 and all(s[1] > 1 for s in prompt_profile)  # the prompt, then forced tokens after a past
    assert api.counts["execute"] < len(got.ids[0])  # every execute, CUDA-graph replays included


def test_batch_1_on_the_static_engine_matches_onnx_runtime(exports, tmp_path):
    session, manifest, _ = session_for(exports, "static", tmp_path)
    want = Generator.from_artifacts(exports["static"]).generate(PROMPTS[:1], max_new_tokens=6, ignore_eos=True).ids
    assert Generator(session, manifest).generate(PROMPTS[:1], max_new_tokens=6, ignore_eos=True).ids == want


def test_static_decoder_keeps_rows_and_takes_the_graph_of_the_smaller_batch(exports, tmp_path):
    """Step by step against ONNX Runtime's static decoder, dropping row 1 after three decode steps."""
    from neoxrt.runtime.generator import left_pad
    from neoxrt.runtime.ort_session import OrtSession

    session, _, api = session_for(exports, "static", tmp_path)
    ref_session = OrtSession(exports["static"] / io.MODEL_FILE)
    ids, mask, pos = left_pad(PROMPTS, 0)
    ours, ref = session.decoder(3, ids.shape[1] + 8), ref_session.decoder(3, ids.shape[1] + 8)
    assert isinstance(ours, TrtStaticDecoder)
    a, b = ours.step(ids, mask, pos), ref.step(ids, mask, pos)
    np.testing.assert_allclose(a, b, atol=1e-4)
    for step in range(6):
        if step == 3:
            ours.keep_rows(np.array([0, 2]))
            ref.keep_rows(np.array([0, 2]))
            mask, pos, b = mask[[0, 2]], pos[[0, 2]], b[[0, 2]]
        nxt = b.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        a, b = ours.step(nxt, mask, pos), ref.step(nxt, mask, pos)
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"decode step {step}")
        assert not np.isnan(a).any()
    assert set(session.graphs) == {(3, 64), (2, 64)} and api.counts["capture"] == 2


def test_dynamic_engine_runs_every_step_without_a_graph(exports, tmp_path):
    session, manifest, api = session_for(exports, "dynamic", tmp_path)
    want = Generator.from_artifacts(exports["dynamic"]).generate(PROMPTS, max_new_tokens=6, ignore_eos=True).ids
    assert Generator(session, manifest).generate(PROMPTS, max_new_tokens=6, ignore_eos=True).ids == want
    assert api.counts["capture"] == 0 and api.counts["replay"] == 0 and api.counts["execute"] == 6
    assert not session.graphs


def test_session_run_matches_onnx_runtime(exports, tmp_path):
    session, _, _ = session_for(exports, "dynamic", tmp_path)
    from neoxrt.runtime.ort_session import OrtSession

    ref = OrtSession(exports["dynamic"] / io.MODEL_FILE)
    ids = np.array([[5, 17, 33, 2]], np.int64)
    feeds = io.prompt_feeds(ids, np.ones_like(ids), np.arange(4)[None], 6, 4, 32, "float32")
    got, want = session.run(feeds), ref.run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


def test_every_refused_tensorrt_call_raises_naming_the_tensor(exports, tmp_path):
    session, manifest, api = session_for(exports, "static", tmp_path)
    api.refuse = {io.past_value(1)}
    refused = r"TensorRT set_input_shape\(past_key_values\.1\.value, \[3, 4, 64, 32\]\) failed"
    with pytest.raises(RuntimeShapeError, match=refused):
        Generator(session, manifest).generate(PROMPTS, max_new_tokens=2)
    api.refuse = set()
    api.fail_execute = True
    with pytest.raises(BuildError, match=r"TensorRT execute_async_v3 failed"):
        Generator(session, manifest).generate(PROMPTS, max_new_tokens=2)
    api.fail_execute = False
    with pytest.raises(BuildError, match=r"set_tensor_address\(no_such\)"):
        session.set_address("no_such", 0)


def test_version_compatible_engines_are_deserialized_with_host_code_allowed(exports, tmp_path):
    _, _, api = session_for(exports, "dynamic", tmp_path, version_compatible=True)
    assert api.deserialized_with is True
    _, _, api = session_for(exports, "dynamic", tmp_path / "2")
    assert api.deserialized_with is False


def test_cache_slots_are_few_and_bounded():
    assert [cache_slots(n, 256) for n in (1, 20, 64, 65, 129, 256)] == [64, 64, 64, 128, 256, 256]
    assert cache_slots(40, 48) == 48
    with pytest.raises(RuntimeShapeError, match="at most 256 cache positions, generation needs 300"):
        cache_slots(300, 256)


class RecordingCudart:
    """cuda-python's runtime surface that Stream uses: records calls, returns (error, value) tuples."""

    cudaStreamCaptureMode = type("Mode", (), {"cudaStreamCaptureModeGlobal": 0, "cudaStreamCaptureModeThreadLocal": 1})

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            return (0, f"{name}-result") if name != "cudaGraphDestroy" else (0,)
        return call


def test_capture_is_thread_local_and_always_ended(monkeypatch):
    rt = RecordingCudart()
    monkeypatch.setattr(tensorrt_api, "cudart", lambda: rt)
    stream = tensorrt_api.Stream()

    def failing():
        raise BuildError("TensorRT execute_async_v3 failed")

    with pytest.raises(BuildError):
        stream.capture(failing)
    names = [c[0] for c in rt.calls]
    assert names[-3:] == ["cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphDestroy"], names
    assert rt.calls[-3][1][1] == 1  # cudaStreamCaptureModeThreadLocal, as trtexec
    rt.calls.clear()
    assert stream.capture(lambda: None) == "cudaGraphInstantiate-result"
    assert [c[0] for c in rt.calls] == ["cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphInstantiate",
                                        "cudaGraphDestroy"]


RUNTIME_ONLY = """
import importlib.abc, sys
BLOCKED = ("neoxrt.export", "onnx", "torch", "triton", "tensorrt.plugin")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"runtime-only install: {{name}} is not installed")
sys.meta_path.insert(0, Block())
sys.path.insert(0, {tests!r})
import json
from pathlib import Path
from neoxrt.runtime import Generator
from neoxrt.runtime.trt_session import TrtSession
from trt_fakes import FakeApi, engine_artifact
folder = Path({folder!r})
manifest = json.loads((folder / "engine-manifest.json").read_text())
session = TrtSession(folder, manifest, api=FakeApi({onnx!r}, manifest))
print(Generator(session, manifest).generate([[5, 17, 33]], max_new_tokens=3, ignore_eos=True).ids)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "torch", "triton") or m.startswith("neoxrt.export")))
"""


def test_a_plugin_engine_runs_on_a_runtime_only_install(exports, tmp_path):
    """No export stage, onnx, torch, triton or tensorrt.plugin: the session of a plugin engine registers
    nothing (the engine carries the kernel's PTX) and generates."""
    folder, manifest = engine_artifact(exports["static"], tmp_path / "engine")
    manifest["plugin"] = {"domain": "neoxrt", "op_type": "GptNeoxAttention"}  # the manifest of a plugin engine
    (folder / "engine-manifest.json").write_text(json.dumps(manifest))
    script = RUNTIME_ONLY.format(tests=str(Path(__file__).parents[1]), folder=str(folder),
                                 onnx=str(exports["static"] / io.MODEL_FILE))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids, modules = done.stdout.strip().splitlines()[-2:]
    want = Generator.from_artifacts(exports["static"]).generate([[5, 17, 33]], max_new_tokens=3, ignore_eos=True).ids
    assert ids == str(want) and modules == "[]"


class FakeTrt:
    """The tensorrt surface of build_serialized_engine and deserialize, recording what it is asked."""

    __version__ = "10.15.1.29"
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    NetworkDefinitionCreationFlag = type("Flag", (), {"STRONGLY_TYPED": 1})
    MemoryPoolType = type("Pool", (), {"WORKSPACE": 0})
    HardwareCompatibilityLevel = type("Level", (), {"AMPERE_PLUS": 1})
    BuilderFlag = type("BuilderFlag", (), {"VERSION_COMPATIBLE": 9})
    IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})

    def __init__(self, foreign_cache: bytes):
        self.foreign, self.config, trt = foreign_cache, None, self

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"timings:" + self.data

        class Config:
            def __init__(self):
                self.flags, self.cache, self.attempts = [], None, []

            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                self.flags.append(flag)

            def create_timing_cache(self, data):
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.attempts.append(cache.data)
                ok = cache.data != trt.foreign
                self.cache = cache if ok else None
                return ok

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                return 0

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                trt.config = Config()
                return trt.config

            def create_optimization_profile(self):
                return type("Profile", (), {"set_shape": lambda self, *a: None})()

            def build_serialized_network(self, network, config):
                return b"engine"

        class Runtime:
            def __init__(self, logger):
                self.engine_host_code_allowed = False
                trt.runtime = self

            def deserialize_cuda_engine(self, data):
                return "engine" if data == b"engine" else None

        self.Builder, self.Runtime = Builder, Runtime
        self.OnnxParser = lambda network, logger: type("Parser", (), {"parse_from_file": lambda self, p: True})()


@pytest.mark.parametrize("cache", [b"", b"ours", b"another GPU's"])
def test_a_timing_cache_from_elsewhere_is_replaced_not_crashed_on(monkeypatch, tmp_path, cache):
    trt = FakeTrt(foreign_cache=b"another GPU's")
    monkeypatch.setattr(tensorrt_api, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_api, "gpu_facts", lambda: {})
    path = tmp_path / "timing.cache"
    path.write_bytes(cache)
    logged = []
    options = BuildOptions(max_context=64, timing_cache=path, version_compatible=True)
    engine, timing = tensorrt_api.build_serialized_engine("m.onnx", {"prompt": {}}, options, logged.append)
    assert engine == b"engine" and FakeTrt.BuilderFlag.VERSION_COMPATIBLE in trt.config.flags
    if cache == b"another GPU's":
        assert trt.config.attempts == [cache, b""] and timing == b"timings:"
        assert any("made by another GPU or TensorRT version: starting a new one" in line for line in logged)
    else:
        assert trt.config.attempts == [cache] and timing == b"timings:" + cache


def test_deserialize_allows_host_code_for_version_compatible_engines_only(monkeypatch):
    trt = FakeTrt(foreign_cache=b"")
    monkeypatch.setattr(tensorrt_api, "import_tensorrt", lambda: trt)
    assert tensorrt_api.deserialize(b"engine", version_compatible=True) == "engine"
    assert trt.runtime.engine_host_code_allowed is True
    tensorrt_api.deserialize(b"engine")
    assert trt.runtime.engine_host_code_allowed is False
    with pytest.raises(BuildError, match="could not deserialize"):
        tensorrt_api.deserialize(b"garbage")


def test_a_tensorrt_older_than_supported_is_one_line(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.8.0.43"))
    with pytest.raises(BuildError, match=r"neoxrt needs TensorRT >= 10.15, found 10.8.0.43"):
        tensorrt_api.import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="11.4.0.106"))
    assert tensorrt_api.import_tensorrt().__version__ == "11.4.0.106"


def test_scheduler_takes_its_limits_from_the_engine_profiles(exports, tmp_path):
    """An engine built for 4 rows and 256 positions: the scheduler runs 4 rows (not its default 16), so a fifth
    request waits instead of failing the batch, and refuses a request past the decode profile, naming both."""
    from neoxrt.runtime.scheduler import Scheduler

    session, manifest, _ = session_for(exports, "dynamic", tmp_path)
    sched = Scheduler(Generator(session, manifest))
    assert sched.max_batch == 4 and sched.limits["context"] == 256
    got: dict = {}
    rids = [sched.submit(p, lambda e: got.setdefault(e.row, []).append(e.token_id), max_new_tokens=5, ignore_eos=True)
            for p in PROMPTS + PROMPTS[:5 - len(PROMPTS)]]
    assert len(rids) == 5
    sched.step()
    assert sched.stats.active == 4 and sched.stats.queued == 1
    while sched.stats.active or sched.stats.queued:
        sched.step()
    want = Generator.from_artifacts(exports["dynamic"])
    for rid, p in zip(rids, PROMPTS + PROMPTS[:5 - len(PROMPTS)]):
        assert got[rid] == want.generate([p], max_new_tokens=5, ignore_eos=True).ids[0]
    with pytest.raises(RuntimeShapeError, match=r"\+ max_new_tokens \(300\) exceeds the engine's decode profile of "
                                                r"256 positions"):
        sched.submit(PROMPTS[0], lambda e: None, max_new_tokens=300)
