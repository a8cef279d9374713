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
