"""Everything around the TensorRT build that runs without TensorRT: the graphs we hand it (checked against
onnx-tensorrt's operator list), the rewrite that makes Attention importable, profiles, build options, engine
compatibility, and the one-line refusal when TensorRT or a GPU is missing."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from neox_testing import default_checkpoint, ort_session, write_variant
from neoxrt import contract as io
from neoxrt import engine_meta
from neoxrt.calibration.calibrate import calibrate_artifact
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.cli import main
from neoxrt.errors import ArtifactError, BuildError, RuntimeShapeError
from neoxrt.export.engine import BuildOptions, engine_profiles, prepare_graph
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.neox_onnx import PLUGIN_DOMAIN, PLUGIN_OP
from neoxrt.export.options import ExportOptions
from neoxrt.export.tensorrt_graph import check_tensorrt_support, support_table, tensorrt_ready
from neoxrt.runtime import Generator

QUIET = dict(log=lambda *_: None)
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    out = {}
    for name, options in {"fused": ExportOptions(kv_cache="dynamic"),
                          "fused-fp16": ExportOptions(dtype="fp16", kv_cache="dynamic"),
                          "decomposed": ExportOptions(attention="decomposed"),
                          "plugin-fp16": ExportOptions(attention="plugin", dtype="fp16"),
                          "static-fp16": ExportOptions(dtype="fp16", kv_cache="static")}.items():
        export_checkpoint(default_checkpoint(), root / name, options, **QUIET)
        out[name] = root / name
    small = write_variant("gelu_parallel", root / "ckpt-256")  # a model with 256 positions
    export_checkpoint(small, root / "small-256", ExportOptions(dtype="fp16", kv_cache="dynamic"), **QUIET)
    out["small-256"] = root / "small-256"
    for name, options in {"int8": CalibrationOptions(samples=8, seq_len=64),
                          "int8-weights": CalibrationOptions(weights_only=True),
                          "int8-dynamic": CalibrationOptions(method="ort-dynamic")}.items():
        calibrate_artifact(out["fused"], root / name, options, progress=False, **QUIET)
        out[name] = root / name
    return out


def _manifest(folder):
    return json.loads((folder / io.MANIFEST_FILE).read_text())


def test_the_support_table_is_data_with_its_source():
    table = support_table()
    assert table["tensorrt"] == "10.15" and "onnx-tensorrt" in table["source"] and "operators.md" in table["source"]
    ops = table["operators"]
    assert ops["Attention"]["supported"] and "past_key" in ops["Attention"]["restrictions"]
    assert not ops["MatMulInteger"]["supported"] and not ops["DynamicQuantizeLinear"]["supported"]


@pytest.mark.parametrize("name", ["fused", "fused-fp16", "decomposed", "int8", "int8-weights", "static-fp16"])
def test_every_graph_we_hand_tensorrt_uses_only_ops_it_imports(artifacts, name):
    model = tensorrt_ready(onnx.load(str(artifacts[name] / io.MODEL_FILE)))
    assert check_tensorrt_support(model) == []


def test_the_plugin_graph_passes_only_with_our_plugin_registered(artifacts):
    model = tensorrt_ready(onnx.load(str(artifacts["plugin-fp16"] / io.MODEL_FILE)))
    problems = check_tensorrt_support(model)
    assert problems and all("no registered TensorRT plugin" in p for p in problems)
    assert check_tensorrt_support(model, {(PLUGIN_DOMAIN, PLUGIN_OP)}) == []
    node = next(n for n in model.graph.node if n.op_type == PLUGIN_OP)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"neoxrt" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1


def test_the_check_names_what_tensorrt_would_refuse(artifacts):
    raw = onnx.load(str(artifacts["fused"] / io.MODEL_FILE))  # 3-D Attention with the cache inside
    assert any("past_key/past_value" in p for p in check_tensorrt_support(raw))
    assert any("4-D Q, K, V only" in p for p in check_tensorrt_support(raw))
    dynamic = check_tensorrt_support(onnx.load(str(artifacts["int8-dynamic"] / io.MODEL_FILE)))
    assert any(p.startswith("MatMulInteger") for p in dynamic) and any("DynamicQuantizeLinear" in p for p in dynamic)
    int8 = onnx.load(str(artifacts["int8"] / io.MODEL_FILE))
    zp = next(t for t in int8.graph.initializer if t.name.endswith(".zero_point") and not t.dims)
    zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    assert any("zero point must be a zero" in p for p in check_tensorrt_support(int8))
    newer = onnx.load(str(artifacts["decomposed"] / io.MODEL_FILE))
    newer.opset_import[0].version = 25
    assert any("opset 25 is outside" in p for p in check_tensorrt_support(newer))


def test_tensorrt_ready_keeps_the_function(artifacts):
    path = artifacts["fused"] / io.MODEL_FILE
    a, b = ort_session(path, "fused"), ort_session(tensorrt_ready(onnx.load(str(path))), "fused")
    rng = np.random.default_rng(0)
    batch, past, seq = 2, 5, 3
    feeds = {io.INPUT_IDS: rng.integers(0, 1000, (batch, seq)),
             io.ATTENTION_MASK: np.ones((batch, past + seq), np.int64),
             io.POSITION_IDS: np.arange(past, past + seq)[None].repeat(batch, 0)}
    for i in range(6):
        feeds[io.past_key(i)] = rng.normal(size=(batch, 4, past, 32)).astype(np.float32)
        feeds[io.past_value(i)] = rng.normal(size=(batch, 4, past, 32)).astype(np.float32)
    names = [o.name for o in a.get_outputs()]
    for x, y in zip(a.run(names, feeds), b.run(names, feeds)):
        np.testing.assert_allclose(x, y, atol=1e-5)
    ops = [n.op_type for n in tensorrt_ready(onnx.load(str(path))).graph.node]
    assert ops.count("Attention") == 6 and ops.count("Concat") >= 12


def test_fused_attention_takes_packed_qkv_without_reshapes(artifacts):
    """The fused export splits the packed [q | k | v] projection into 3-D q, k, v: no Reshape or Transpose in
    the layers (tensorrt_ready adds them back for TensorRT, tested above); the static cache keeps the 4-D form."""
    ops = [n.op_type for n in onnx.load(str(artifacts["fused"] / io.MODEL_FILE)).graph.node]
    assert ops.count("Transpose") == 0 and ops.count("Reshape") == 0 and ops.count("Split") == 6
    static = [n.op_type for n in onnx.load(str(artifacts["static-fp16"] / io.MODEL_FILE)).graph.node]
    assert static.count("Transpose") == 12 and static.count("TensorScatter") == 12


def test_profiles_cover_prompt_and_decode_and_agree_across_inputs(artifacts):
    manifest = _manifest(artifacts["fused-fp16"])
    axes, shapes = engine_profiles(manifest, BuildOptions(max_batch=8, max_context=512, opt_batch=4))
    assert axes["prompt"][io.SEQUENCE] == [1, 128, 512] and axes["prompt"][io.PAST_SEQUENCE] == [0, 0, 0]
    assert axes["decode"][io.SEQUENCE] == [1, 1, 1] and axes["decode"][io.PAST_SEQUENCE] == [1, 256, 511]
    assert axes["decode"][io.TOTAL_SEQUENCE] == [2, 257, 512]
    assert shapes["decode"][io.past_key(0)] == [[1, 4, 1, 32], [4, 4, 256, 32], [8, 4, 511, 32]]
    assert shapes["decode"][io.ATTENTION_MASK] == [[1, 2], [4, 257], [8, 512]]
    assert shapes["prompt"][io.INPUT_IDS] == [[1, 1], [4, 128], [8, 512]]
    ranges = engine_meta.ranges_from_manifest(axes)
    assert engine_meta.select_profile(ranges, 8, 100, 0) == "prompt"
    assert engine_meta.select_profile(ranges, 1, 1, 511) == "decode"
    with pytest.raises(RuntimeShapeError, match=r"supports past_sequence in \[1, 511\], got 4096"):
        engine_meta.select_profile(ranges, 1, 1, 4096)
    with pytest.raises(RuntimeShapeError, match=r"supports batch in \[1, 8\], got 9"):
        engine_meta.select_profile(ranges, 9, 3, 0)
    with pytest.raises(RuntimeShapeError, match=r"engine has no verify profile: a step of 2 tokens after a past of"):
        engine_meta.select_profile(ranges, 1, 2, 10)  # chunked prefill is outside both profiles


def test_build_defaults_fit_the_model(artifacts):
    """A model with 256 positions builds with the defaults: --max-context defaults to min(2048, 256) and the
    tuning shapes derive from it; only an explicit --max-context past the model is refused."""
    manifest = _manifest(artifacts["small-256"])
    assert manifest["config"]["max_position_embeddings"] == 256
    axes, _ = engine_profiles(manifest, BuildOptions())
    assert axes["prompt"][io.SEQUENCE] == [1, 128, 256] and axes["decode"][io.PAST_SEQUENCE] == [1, 128, 255]
    fitted = BuildOptions().for_model(256)
    assert (fitted.max_context, fitted.opt_prompt, fitted.opt_past) == (256, 128, 128)
    assert BuildOptions().for_model(4096).max_context == 2048
    assert BuildOptions(max_context=100).for_model(256).opt_past == 50
    with pytest.raises(BuildError, match="--max-context 512 is past the model's max_position_embeddings 256"):
        engine_profiles(manifest, BuildOptions(max_context=512))


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
def test_neoxrt_build_with_no_options_gets_past_the_defaults_on_a_small_model(artifacts, tmp_path, capsys):
    assert main(["build", str(artifacts["small-256"]), str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "max-context" not in err, err


def test_neoxrt_build_takes_verify_tokens(artifacts, tmp_path, capsys):
    """--verify-tokens reaches the profiles (past them: TensorRT missing here); out of range: one line, exit 2."""
    assert main(["build", str(artifacts["small-256"]), str(tmp_path / "engine"), "--verify-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "verify" not in err, err
    assert main(["build", str(artifacts["small-256"]), str(tmp_path / "engine"), "--verify-tokens", "255"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--verify-tokens must be in [1, 254]" in err and not (tmp_path / "engine").exists()


def test_static_cache_artifacts_get_the_static_profiles(artifacts):
    """--kv-cache static: past and present [B, H, C, D] over cache slots C; the prompt and decode profiles
    range C, not a past length; TensorScatter is on onnx-tensorrt's list, so the graph passes the check."""
    manifest = _manifest(artifacts["static-fp16"])
    axes, shapes = engine_profiles(manifest, BuildOptions(max_batch=4, max_context=512))
    assert axes["decode"] == {io.BATCH: [1, 4, 4], io.SEQUENCE: [1, 1, 1], io.CACHE_SEQUENCE: [2, 257, 512]}
    assert axes["prompt"][io.CACHE_SEQUENCE] == [1, 257, 512] and axes["prompt"][io.SEQUENCE] == [1, 128, 512]
    assert shapes["decode"][io.past_key(0)] == [[1, 4, 2, 32], [4, 4, 257, 32], [4, 4, 512, 32]]
    assert shapes["decode"][io.WRITE_INDICES] == [[1], [4], [4]]
    assert shapes["decode"][io.ATTENTION_MASK] == [[1, 2], [4, 257], [4, 512]]
    assert prepare_graph(artifacts["static-fp16"], manifest, BuildOptions())
    ranges = engine_meta.ranges_from_manifest(axes)
    assert engine_meta.select_profile(ranges, 2, 1, 40, 64) == "decode"
    with pytest.raises(RuntimeShapeError, match=r"supports cache_sequence in \[2, 512\], got 1024"):
        engine_meta.select_profile(ranges, 2, 1, 40, 1024)


def test_inconsistent_and_invalid_profiles_are_refused(artifacts):
    manifest = _manifest(artifacts["fused"])
    with pytest.raises(BuildError, match="needs min <= opt <= max, got 1 <= 16 <= 8"):
        engine_profiles(manifest, BuildOptions(max_batch=8, opt_batch=16))
    with pytest.raises(BuildError, match="past the model's max_position_embeddings 2048"):
        engine_profiles(manifest, BuildOptions(max_context=4096))
    inputs = [{"name": "a", "shape": [io.BATCH, io.SEQUENCE]}, {"name": "b", "shape": [io.BATCH, io.SEQUENCE]}]
    shapes = {"prompt": {"a": [[1, 1], [2, 2], [4, 4]], "b": [[1, 1], [2, 3], [4, 4]]}}
    with pytest.raises(BuildError, match="axis sequence is 2 for a but 3 for b"):
        engine_meta.check_consistent(shapes, inputs)
    for bad, message in ((dict(max_batch=0), "--max-batch"), (dict(optimization_level=7), "--optimization-level"),
                         (dict(hardware_compatibility="turing"), "--hardware-compatibility")):
        with pytest.raises(BuildError, match=message):
            BuildOptions(**bad)


def test_prepare_graph_refuses_plugin_mismatches_and_unsupported_graphs(artifacts):
    with pytest.raises(BuildError, match="pass --plugin"):
        prepare_graph(artifacts["plugin-fp16"], _manifest(artifacts["plugin-fp16"]), BuildOptions())
    with pytest.raises(BuildError, match="--plugin needs an export made with --attention plugin"):
        prepare_graph(artifacts["fused"], _manifest(artifacts["fused"]), BuildOptions(plugin=True))
    with pytest.raises(BuildError, match="TensorRT would refuse .*MatMulInteger"):
        prepare_graph(artifacts["int8-dynamic"], _manifest(artifacts["int8-dynamic"]), BuildOptions())
    assert prepare_graph(artifacts["plugin-fp16"], _manifest(artifacts["plugin-fp16"]), BuildOptions(plugin=True))


def _engine_manifest(tensorrt="10.15.1", cc="9.0", gpu="NVIDIA H100", **options):
    return {"engine": {"tensorrt": tensorrt, "gpu": gpu, "compute_capability": cc}, "build_options": options}


def test_engines_are_refused_on_another_tensorrt_or_gpu_with_both_named():
    here = {"tensorrt": "10.15.1", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    engine_meta.check_engine_compatible(_engine_manifest(), here)
    with pytest.raises(ArtifactError, match=r"TensorRT 10.15.1 for NVIDIA H100 \(sm 9.0\).*TensorRT 11.0.0 and NVIDIA H100"):
        engine_meta.check_engine_compatible(_engine_manifest(), {**here, "tensorrt": "11.0.0"})
    with pytest.raises(ArtifactError, match=r"NVIDIA A100 \(sm 8.0\)"):
        engine_meta.check_engine_compatible(_engine_manifest(), {**here, "gpu": "NVIDIA A100", "compute_capability": "8.0"})
    # version-compatible engines run on later TensorRT of the same major (10.9 < 10.15 numerically), not earlier
    engine_meta.check_engine_compatible(_engine_manifest("10.9.0", version_compatible=True), here)
    with pytest.raises(ArtifactError):
        engine_meta.check_engine_compatible(_engine_manifest("10.16.0", version_compatible=True), here)
    ampere = _engine_manifest(cc="8.6", gpu="NVIDIA A10", hardware_compatibility="ampere_plus")
    engine_meta.check_engine_compatible(ampere, here)
    with pytest.raises(ArtifactError):
        engine_meta.check_engine_compatible(ampere, {**here, "compute_capability": "7.5"})


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
def test_build_without_tensorrt_is_one_line_and_exit_2(artifacts, tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["build", str(artifacts["fused-fp16"]), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TensorRT is not installed" in err, err
    assert not out.exists() and not list(tmp_path.iterdir())
    # input errors are reported before the missing TensorRT
    assert main(["build", str(artifacts["int8-dynamic"]), str(out)]) == 2
    assert "MatMulInteger" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
def test_an_engine_artifact_on_a_machine_without_tensorrt_is_one_line(artifacts, tmp_path, capsys):
    from neoxrt.manifest import write_manifest

    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / engine_meta.ENGINE_FILE).write_bytes(b"not an engine")
    source = _manifest(artifacts["fused-fp16"])
    axes, _ = engine_profiles(source, BuildOptions())
    write_manifest(folder, "build", {"config": source["config"], "io": source["io"], "profiles": axes,
                                     "profile_order": list(axes), "precision": "fp16",
                                     "engine": {"tensorrt": "10.15.1", "gpu": "NVIDIA H100", "compute_capability": "9.0"}},
                   [engine_meta.ENGINE_FILE])
    with pytest.raises(BuildError, match="TensorRT is not installed"):
        Generator.from_artifacts(folder)
    with pytest.raises(ArtifactError, match="backend 'onnxruntime' runs ONNX artifacts"):
        Generator.from_artifacts(folder, backend="onnxruntime")
    with pytest.raises(ArtifactError, match="backend 'tensorrt' runs engines"):
        Generator.from_artifacts(artifacts["fused"], backend="tensorrt")
    assert main(["generate", str(folder), "--prompt", "hi"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
