"""--kv-cache static: fixed cache slots updated in place by TensorScatter-24 (no per-step cache copy). Same
numbers and tokens as the dynamic contract, proved by compare, calibratable, refused by neoxrt build."""

import json

import numpy as np
import onnx
import pytest

from neox_testing import default_checkpoint
from neoxrt import contract as io
from neoxrt.errors import ExportError
from neoxrt.export.engine import BuildOptions, engine_profiles
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.export.tensorrt_graph import check_tensorrt_support, tensorrt_ready
from neoxrt.report.compare import CompareOptions, run_compare
from neoxrt.runtime import Generator
from neoxrt.runtime.generator import left_pad
from neoxrt.runtime.ort_session import OrtBoundDecoder, OrtSession, OrtStaticDecoder

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    export_checkpoint(default_checkpoint(), root / "dynamic", ExportOptions(kv_cache="dynamic"), **QUIET)
    export_checkpoint(default_checkpoint(), root / "static", ExportOptions(kv_cache="static"), **QUIET)
    return root / "dynamic", root / "static"


def test_the_default_export_is_the_static_cache_where_it_applies():
    assert ExportOptions().kv_cache == "static" and ExportOptions().opset == 24
    for other in (dict(attention="decomposed"), dict(attention="plugin"), dict(opset=23), dict(task="text-classification")):
        assert ExportOptions(**other).kv_cache == "dynamic", other
    assert ExportOptions().for_task("text-classification").kv_cache == "dynamic"  # a head's checkpoint: no cache
    assert ExportOptions(kv_cache="static").for_task("text-generation").kv_cache == "static"
    with pytest.raises(ExportError, match="applies to text-generation only"):  # chosen, not defaulted: refused
        ExportOptions(kv_cache="static").for_task("text-classification")


def test_logits_to_keep_defaults_to_every_position(pair):
    """An input with a default (not in the contract): unfed, every position's logits; K, the last K positions'."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(pair[1] / io.MODEL_FILE), providers=["CPUExecutionProvider"])
    assert io.LOGITS_TO_KEEP not in {i.name for i in sess.get_inputs()}
    assert [i.name for i in sess.get_overridable_initializers()] == [io.LOGITS_TO_KEEP]
    ids = np.array([[510, 1375, 273, 253, 6398, 310]], np.int64)
    feeds = io.prompt_feeds(ids, np.ones_like(ids), np.arange(6)[None], 6, 4, 32, "float32", static=True)
    every = sess.run([io.LOGITS], feeds)[0]
    assert every.shape[:2] == (1, 6)
    for keep in (1, 2):
        last = sess.run([io.LOGITS], {**feeds, io.LOGITS_TO_KEEP: np.array([keep], np.int64)})[0]
        assert last.shape[:2] == (1, keep)
        np.testing.assert_allclose(last, every[:, -keep:], atol=1e-5)


def test_tensorrt_gets_logits_to_keep_as_a_constant(pair):
    trt = tensorrt_ready(onnx.load(str(pair[1] / io.MODEL_FILE)))
    assert io.LOGITS_TO_KEEP not in {i.name for i in trt.graph.input}
    assert io.LOGITS_TO_KEEP in {t.name for t in trt.graph.initializer}
    assert check_tensorrt_support(trt) == []


def test_the_static_contract(pair):
    manifest = json.loads((pair[1] / io.MANIFEST_FILE).read_text())
    inputs = {t["name"]: t["shape"] for t in manifest["io"]["inputs"]}
    outputs = {t["name"]: t["shape"] for t in manifest["io"]["outputs"]}
    assert inputs[io.past_key(0)] == outputs[io.present_key(0)] == [io.BATCH, 4, io.CACHE_SEQUENCE, 32]
    assert inputs[io.WRITE_INDICES] == [io.BATCH] and inputs[io.ATTENTION_MASK] == [io.BATCH, io.CACHE_SEQUENCE]
    assert manifest["opset"] == 24
    ops = [n.op_type for n in onnx.load(str(pair[1] / io.MODEL_FILE)).graph.node]
    assert ops.count("TensorScatter") == 12 and "Concat" not in ops


def test_static_steps_match_dynamic_steps_and_write_the_cache_in_place(pair):
    dyn, sta = (OrtSession(p / io.MODEL_FILE, threads=1) for p in pair)
    ids, mask, pos = left_pad([[5, 17, 33, 2, 90, 41, 7], [12, 3, 64]])
    a, b = dyn.decoder(2, 16), sta.decoder(2, 16)
    assert isinstance(a, OrtBoundDecoder) and isinstance(b, OrtStaticDecoder)
    for step in range(6):
        la, lb = a.step(ids, mask, pos), b.step(ids, mask, pos)
        np.testing.assert_allclose(lb, la, atol=2e-5, err_msg=f"step {step}")
        if step == 2:  # drop row 0 from both: the cache is compacted, later steps run on batch 1
            a.keep_rows(np.array([1]))
            b.keep_rows(np.array([1]))
            mask, pos, la = mask[1:], pos[1:], la[1:]
        ids = la.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], 1)
        pos = pos[:, -1:] + 1
    # the bound buffer itself holds the cache: TensorScatter wrote into it in place
    total = b.past_len
    dyn_k = a._view(a.current, 0, total)
    valid = mask[:, None, :total - 1, None].astype(bool)
    np.testing.assert_allclose(np.where(valid, b.cache[0][:1, :, :total - 1], 0),
                               np.where(valid, dyn_k[:, :, :total - 1], 0), atol=1e-5)


def test_generation_and_compare(pair):
    prompts = ["The state of the Union is", "Gentlemen of the Senate"]
    a, b = (Generator.from_artifacts(p).generate(prompts, max_new_tokens=20).ids for p in pair)
    assert a == b
    report = run_compare(pair[1], default_checkpoint(), CompareOptions(progress=False, windows=4, max_new_tokens=8))
    assert report["passed"] and report["per_layer"]["available"]


def test_tensorrt_imports_the_graph_and_the_build_takes_it(pair):
    model = tensorrt_ready(onnx.load(str(pair[1] / io.MODEL_FILE)))
    assert check_tensorrt_support(model) == []
    manifest = json.loads((pair[1] / io.MANIFEST_FILE).read_text())
    axes, _ = engine_profiles(manifest, BuildOptions())
    assert io.CACHE_SEQUENCE in axes["decode"] and io.PAST_SEQUENCE not in axes["decode"]


def test_static_needs_fused_attention():
    with pytest.raises(ExportError, match="--kv-cache static needs --attention fused"):
        ExportOptions(kv_cache="static", attention="decomposed")
