"""Conformance of neoxrt's TensorRT code with the real TensorRT Python bindings, without a GPU.

The `tensorrt-cu12-bindings` wheels (the compiled module and the pure-Python `tensorrt.plugin` package,
~1.2 MB each) of the oldest and newest TensorRT we support are fetched by `make test` (TRT_WHEELS in the
Makefile, cached in .cache/tensorrt-wheels). The compiled module cannot be imported here (its libraries
are not installed), but pybind11 keeps every class, method, property and enum name as a string in it:
every TensorRT name neoxrt uses must be one of them, in both versions. The tests skip, saying why, only
where the wheels could not be had; CI sets NEOXRT_REQUIRE_TRT_WHEELS=1 so that there they fail instead.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from neoxrt.tensorrt_api import ptx_isa_for_driver

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(os.environ.get("NEOXRT_TRT_WHEELS", ROOT / ".cache" / "tensorrt-wheels"))
# the modules that call TensorRT, and the local names that hold TensorRT objects in them
TRT_FILES = ("neoxrt/tensorrt_api.py", "runtime/trt_session.py")
TRT_OBJECTS = {"trt", "builder", "network", "parser", "config", "profile", "runtime", "cache", "timing", "ctx"}
TRT_MEMBERS = {"context", "engine"}  # self.context, self.engine


def supported_versions() -> list[str]:
    """The bindings versions the Makefile fetches (oldest and newest supported), from TRT_WHEELS."""
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("TRT_WHEELS ?="))
    return re.findall(r"tensorrt-cu12-bindings==(\S+)", line)


def bindings_wheel(version: str) -> Path:
    found = sorted(WHEELS.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not found:
        message = f"tensorrt-cu12-bindings=={version} is not in {WHEELS} (make trt-wheels fetches it from PyPI)"
        if os.environ.get("NEOXRT_REQUIRE_TRT_WHEELS"):
            pytest.fail(message)
        pytest.skip(message)
    return found[0]


def compiled_module(version: str) -> bytes:
    with zipfile.ZipFile(bindings_wheel(version)) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"tensorrt_bindings/tensorrt[^/]*\.so", n))
        return z.read(name)


def plugin_sources(version: str) -> str:
    with zipfile.ZipFile(bindings_wheel(version)) as z:
        return "\n".join(z.read(n).decode() for n in z.namelist() if n.startswith("tensorrt_bindings/plugin/"))


def in_module(blob: bytes, name: str) -> bool:
    """`name` is a NUL-terminated string of the module (the linker may share its tail with a longer name:
    "serialize" lives in "deserialize"; a name that is not there at all is still caught)."""
    return name.encode() + b"\0" in blob


def _is_trt_object(node: ast.AST) -> bool:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return node.attr in TRT_MEMBERS
        node = node.func if isinstance(node, ast.Call) else node.value
    return isinstance(node, ast.Name) and node.id in TRT_OBJECTS


def tensorrt_names_used() -> tuple[set[str], set[str]]:
    """(names looked up on TensorRT objects, names looked up on tensorrt.plugin) in the TensorRT modules,
    plus the methods our subclasses of TensorRT classes override (TensorRT calls them by name)."""
    core, plugin = set(), set()
    for rel in TRT_FILES:
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in ("trtp", "launch"):
                    plugin.add(node.attr)
                elif _is_trt_object(node.value):
                    core.add(node.attr)
            elif isinstance(node, ast.ClassDef) and any(_is_trt_object(b) for b in node.bases):
                core.update(f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__"))
    return core, plugin


def test_the_scan_finds_the_calls_that_matter():
    core, plugin = tensorrt_names_used()
    assert {"engine_host_code_allowed", "set_timing_cache", "get_timing_cache", "execute_async_v3", "set_input_shape",
            "set_tensor_address", "set_optimization_profile_async", "create_execution_context", "STRONGLY_TYPED",
            "VERSION_COMPATIBLE", "AMPERE_PLUS", "phase_start", "step_complete", "serialize", "desc"} <= core
    assert {"register", "autotune", "aot_impl", "KernelLaunchParams", "SymIntExprs", "grid_x", "shared_mem"} <= plugin
    assert len(supported_versions()) == 2


@pytest.mark.parametrize("version", supported_versions())
def test_every_tensorrt_name_we_use_is_in_the_real_bindings(version):
    blob = compiled_module(version)
    core, plugin = tensorrt_names_used()
    missing = sorted(n for n in core if not in_module(blob, n))
    assert not missing, f"TensorRT {version}'s bindings have no {missing}"
    assert not in_module(blob, "execute_async_v4") and not in_module(blob, "engine_host_code_allowd")  # the check can fail
    source = plugin_sources(version)
    absent = sorted(n for n in plugin if not re.search(rf"\b(def|class) {n}\b|\bself\.{n}\b|\b{n}\s*[:=]", source))
    assert not absent, f"TensorRT {version}'s tensorrt.plugin has no {absent}"


def test_every_tensorrt_name_we_use_is_in_tensorrt_stubs():
    stubs = sorted(WHEELS.glob("tensorrt_stubs-*.whl"))
    if not stubs:
        message = f"tensorrt-stubs is not in {WHEELS} (make trt-wheels fetches it)"
        if os.environ.get("NEOXRT_REQUIRE_TRT_WHEELS"):
            pytest.fail(message)
        pytest.skip(message)
    with zipfile.ZipFile(stubs[0]) as z:
        text = z.read("tensorrt_bindings/tensorrt.pyi").decode()
    core, _ = tensorrt_names_used()
    missing = sorted(n for n in core if not re.search(rf"\b{n}\b", text))
    assert not missing, f"{stubs[0].name} declares no {missing}"


def test_ptx_isa_of_each_driver():
    """The CUDA release notes' table (cudaDriverGetVersion -> newest PTX ISA), as Triton uses it."""
    table = {11080: 78, 12000: 80, 12040: 84, 12050: 85, 12060: 85, 12080: 87, 12090: 88, 13000: 90, 13010: 91}
    assert {v: ptx_isa_for_driver(v) for v in table} == table


AOT = """
import json, re
from neoxrt.export.plugin_kernel import compile_ptx
from neoxrt.tensorrt_api import ptx_isa_for_driver
out = {}
for label, arch, driver in (("h100-driver-12.4", 90, 12040), ("ampere-plus-driver-12.0", 80, 12000), ("uncapped", 90, None)):
    cap = None if driver is None else ptx_isa_for_driver(driver)
    k = compile_ptx("fp16", 4, 32, 8, 32 ** -0.5, target=("cuda", arch), ptx_isa=cap)
    out[label] = {"version": re.search(r"\\.version (\\S+)", k["ptx"]).group(1),
                  "target": re.search(r"\\.target (\\S+)", k["ptx"]).group(1), "cap": cap, "ptx_isa": k["ptx_isa"]}
print(json.dumps(out))
"""


def test_the_plugin_ptx_version_is_capped_to_the_driver():
    """The PTX TensorRT embeds says `.version` at most what the driver accepts (Triton 3.9 writes 9.x for
    sm_90a unless told), and PTX for hardware-compatible engines targets sm_80, which Ampere loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", AOT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["h100-driver-12.4"]["version"] == "8.4" and out["h100-driver-12.4"]["target"] == "sm_90a"
    assert out["ampere-plus-driver-12.0"]["version"] == "8.0" and out["ampere-plus-driver-12.0"]["target"] == "sm_80"
    assert out["uncapped"]["ptx_isa"] > 84, out  # what a driver 12.4 would refuse: the cap is what makes it load


PLUGIN_DRIVER = r"""
import json, re, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["path"])
import numpy as np
import tensorrt as trt
from neoxrt import tensorrt_api

if not args["guard"]:
    tensorrt_api.check_plugin_numpy = lambda *a: None
try:
    tensorrt_api.register_attention_plugin((9, 0), 84)
except Exception as exc:
    print(json.dumps({"registration": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
out = {}
# the ONNX parser: creator by name / version / namespace, the node's attributes as fields (INT -> INT32[1],
# FLOAT -> FLOAT32[1]; plugin_namespace, plugin_version and aot are the parser's own), strictly the AOT plugin
creator = trt.get_plugin_registry().get_creator("GptNeoxAttention", "1", "neoxrt")
out["fields"] = [f.name for f in creator.field_names]
H, D, R = 4, 32, 8
fc = trt.PluginFieldCollection([
    trt.PluginField("num_heads", np.array([H], np.int32), trt.PluginFieldType.INT32),
    trt.PluginField("head_size", np.array([D], np.int32), trt.PluginFieldType.INT32),
    trt.PluginField("rotary_dim", np.array([R], np.int32), trt.PluginFieldType.INT32),
    trt.PluginField("scale", np.array([D ** -0.5], np.float32), trt.PluginFieldType.FLOAT32)])
try:
    plugin = creator.create_plugin("GptNeoxAttention", "neoxrt", fc, trt.TensorRTPhase.BUILD,
                                   trt.QuickPluginCreationRequest.STRICT_AOT)
except Exception as exc:
    out["create_plugin"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    sys.exit(0)
out["aot"] = isinstance(plugin, trt.IPluginV3QuickAOTBuild)
T = trt.DataType
out["dtypes"] = [t.name for t in plugin.get_output_data_types([T.HALF, T.FLOAT, T.FLOAT, T.INT32, T.HALF, T.HALF],
                                                                [3, 3, 3, 2, 4, 4])]
# the builder: symbolic shapes (batch B, new tokens S, past P), evaluated afterwards
eb = trt.IExprBuilder()
B, S, P = (trt.IDimensionExpr(symbol=n) for n in "BSP")
c = eb.constant
def dims(*e):
    d = trt.DimsExprs(len(e))
    for i, x in enumerate(e):
        d[i] = x
    return d
inputs = [dims(B, S, c(3 * H * D)), dims(B, S, c(R)), dims(B, S, c(R)), dims(B, eb.operation(trt.DimensionOperation.SUM, P, S)),
          dims(B, c(H), P, c(D)), dims(B, c(H), P, c(D))]
env = {"B": 2, "S": 5, "P": 7}
out["shapes"] = [[e.evaluate(env) for e in o] for o in plugin.get_output_shapes(inputs, [], eb)]
concrete = [(2, 5, 3 * H * D), (2, 5, R), (2, 5, R), (2, 12), (2, H, 7, D), (2, H, 7, D), (2, 5, H * D), (2, H, 12, D),
            (2, H, 12, D)]
def io(types):
    descs = []
    for shape, t in zip(concrete, types):
        d = trt.PluginTensorDesc()
        d.type, d.format, d.dims = t, trt.TensorFormat.LINEAR, trt.Dims(shape)
        descs.append(trt.DynamicPluginTensorDesc(d, trt.Dims(shape), trt.Dims(shape)))
    return descs
fp16 = [T.HALF, T.FLOAT, T.FLOAT, T.INT32] + [T.HALF] * 5
combos = plugin.get_supported_format_combinations(io(fp16), 6)
out["combinations"] = [[d.type.name for d in combos[i:i + 9]] for i in range(0, len(combos), 9)]
in_out = io(fp16)
plugin.configure_plugin(in_out[:6], in_out[6:])
out["tactics"] = plugin.get_valid_tactics()
plugin.set_tactic(0)
class Launch: pass
class Setter:
    def __init__(self): self.exprs = {}
    def __setitem__(self, i, e): self.exprs[i] = e
launch, setter = Launch(), Setter()
plugin.get_launch_params(inputs, in_out, 6, launch, setter, eb)
ev = lambda e: e.expr.evaluate(env)
out["launch"] = {k: ev(getattr(launch, k)) for k in ("grid_x", "grid_y", "grid_z", "block_x", "shared_mem")}
out["scalars"] = [ev(setter.exprs[i]) for i in range(setter.nbSymExprs)]
out["scalar_types"] = [setter.exprs[i].dtype.name for i in range(setter.nbSymExprs)]
name, ptx = plugin.get_kernel([d.desc for d in in_out[:6]], [d.desc for d in in_out[6:]])
out["kernel"] = name.decode() if isinstance(name, bytes) else name
out["ptx_version"] = re.search(rb"\.version (\S+)", ptx).group(1).decode()
out["ptx_target"] = re.search(rb"\.target (\S+)", ptx).group(1).decode()
print(json.dumps(out))
"""


def _drive_plugin(version: str, tmp_path: Path, guard: bool = True) -> dict:
    """Register and drive the plugin through `version`'s real tensorrt.plugin over the stand-in core."""
    import numpy

    package = tmp_path / "site" / "tensorrt"
    with zipfile.ZipFile(bindings_wheel(version)) as z:
        for name in z.namelist():
            if name.startswith("tensorrt_bindings/plugin/"):
                target = package / "plugin" / name.split("tensorrt_bindings/plugin/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    core = (ROOT / "tests" / "trt_core_standin.py").read_text().replace('__version__ = "0.0.0"', f'__version__ = "{version}"')
    (package / "__init__.py").write_text(core)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    arg = json.dumps({"path": str(package.parent), "guard": guard})
    done = subprocess.run([sys.executable, "-c", PLUGIN_DRIVER, arg], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["numpy"] = numpy.__version__
    return out


@pytest.mark.parametrize("version", supported_versions())
def test_the_plugin_registers_and_builds_through_the_real_tensorrt_plugin(version, tmp_path):
    """Creator lookup, create_plugin with the node's fields as the parser passes them, output types and
    shapes, the autotune combinations, the AOT launch (grid (B*H, S), 4 warps, int32 scalars S and P) and the
    kernel with its capped PTX -- by `version`'s own tensorrt.plugin code. On TensorRT < 11.4 with NumPy >= 2.4
    our guard refuses first, in one line (the unguarded case is the next test)."""
    from neoxrt.tensorrt_api import PLUGIN_NUMPY_FIX, version_tuple

    out = _drive_plugin(version, tmp_path)
    if version_tuple(version)[:2] < PLUGIN_NUMPY_FIX and version_tuple(out["numpy"])[:2] >= (2, 4):
        assert out == {"registration": f"BuildError: TensorRT {version}'s tensorrt.plugin fails with NumPy {out['numpy']} "
                                       "(fixed in TensorRT 11.4): pip install 'numpy<2.4' or TensorRT >= 11.4",
                       "numpy": out["numpy"]}
        return
    assert out["fields"] == ["num_heads", "head_size", "rotary_dim", "scale"] and out["aot"] is True
    assert out["dtypes"] == ["HALF", "HALF", "HALF"]
    assert out["shapes"] == [[2, 5, 128], [2, 4, 12, 32], [2, 4, 12, 32]]
    assert out["combinations"] == [["HALF", "FLOAT", "FLOAT", "INT32"] + ["HALF"] * 5,
                                   ["FLOAT", "FLOAT", "FLOAT", "INT32"] + ["FLOAT"] * 5]
    assert out["tactics"] == []
    assert out["launch"]["grid_x"] == 2 * 4 and out["launch"]["grid_y"] == 5 and out["launch"]["grid_z"] == 1
    assert out["launch"]["block_x"] == 4 * 32 and out["launch"]["shared_mem"] >= 0
    assert out["scalars"] == [5, 7] and out["scalar_types"] == ["INT32", "INT32"]
    assert out["kernel"] == "gpt_neox_attention_kernel"
    assert out["ptx_version"] == "8.4" and out["ptx_target"] == "sm_90a"


def test_tensorrt_before_11_4_breaks_on_numpy_2_4_which_the_guard_catches_first(tmp_path):
    """Finding 3, shown on the real code: TensorRT 10.15's tensorrt.plugin calls int() on a 1-element array."""
    import numpy

    from neoxrt.tensorrt_api import version_tuple

    oldest = supported_versions()[0]
    if version_tuple(numpy.__version__)[:2] < (2, 4):
        pytest.skip(f"NumPy {numpy.__version__} here: the failure needs NumPy >= 2.4")
    out = _drive_plugin(oldest, tmp_path, guard=False)
    assert out.get("create_plugin", "").startswith("TypeError"), out


@pytest.mark.parametrize("version", supported_versions())
def test_the_stand_in_core_names_only_what_the_bindings_have(version):
    """The stand-in core behind the plugin test declares TensorRT's names, not made-up ones."""
    blob = compiled_module(version)
    tree = ast.parse((ROOT / "tests" / "trt_core_standin.py").read_text())
    ours = {"evaluate", "nptype", "creators"}  # the stand-in's own helpers (nptype lives in tensorrt/__init__.py)
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            names.add(node.name)
            names.update(f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_"))
            names.update(t.id for a in node.body if isinstance(a, ast.Assign) for t in a.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names.add(node.name)
    names -= ours
    assert len(names) > 60
    missing = sorted(n for n in names if not in_module(blob, n))
    assert not missing, f"TensorRT {version}'s bindings have no {missing}"
