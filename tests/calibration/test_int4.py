"""INT4 weights-only (neoxrt calibrate --weights-only --bits 4) on the trained default model: the packing, the
accuracy bar against PyTorch, the TensorRT form (INT4 DequantizeLinear) against the ONNX Runtime form
(MatMulNBits) on ONNX Runtime CPU, awq against rtn on planted activation outliers, fp16 and external-data
sources, and bad inputs as one line with exit 2 and nothing written."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from neox_testing import VARIANTS, assert_refused, default_checkpoint
from neoxrt import contract as io
from neoxrt.bench.large import POLL_ANON
from neoxrt.calibration.calibrate import calibrate_artifact
from neoxrt.calibration.int4 import (
    block_scales,
    dequantize_blocks,
    int4_tensor,
    pack_matmulnbits,
    quantize_blocks,
    unpack_matmulnbits,
)
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.export.tensorrt_graph import check_tensorrt_support, tensorrt_ready
from neoxrt.manifest import write_manifest
from neoxrt.model import random_model, save_checkpoint
from neoxrt.report.compare import CompareOptions, run_compare

QUIET = dict(log=lambda *_: None, progress=False)


def int4(**kw):
    return CalibrationOptions(weights_only=True, bits=4, **kw)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "fp32"
    export_checkpoint(default_checkpoint(), out, ExportOptions(), log=lambda *_: None)
    return out


def test_packing_round_trips_and_matches_onnx_int4():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 6)).astype(np.float32)
    scales = block_scales(w, 32)
    q = quantize_blocks(w, scales)
    assert q.min() >= -8 and q.max() <= 7
    assert np.array_equal(unpack_matmulnbits(pack_matmulnbits(q, 32), 64), q)
    assert np.array_equal(unpack_matmulnbits(pack_matmulnbits(q.astype(np.int16) * 16, 32, 8), 64, 8), q * 16)
    assert np.array_equal(numpy_helper.to_array(int4_tensor("q", q)).astype(np.int8), q)
    assert np.abs(dequantize_blocks(q, scales) - w).max() <= scales.max() / 2 + 1e-6


def _check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)["value"]


def test_default_int4_meets_the_accuracy_target(fp32, tmp_path):
    """The default (gptq, block 32, the LM head in 8-bit blocks); on the whole held-out text (400 x 256 tokens):
    +0.039 % perplexity against rtn's +0.109 % (docs)."""
    manifest = calibrate_artifact(fp32, tmp_path / "a", int4(), **QUIET)
    assert manifest["precision"] == "int4"
    q = manifest["quantization"]
    assert (q["bits"], q["block_size"], q["accuracy_level"], q["method"], q["rounding"], q["lm_head"]) == \
        (4, 32, 4, "gptq", "gptq", "int8")
    assert q["matmuls"] == 25 and q["awq_layernorms"] == 0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "a" / io.MODEL_FILE)).graph.node]
    assert ops.count("MatMulNBits") == 25 and "DequantizeLinear" not in ops
    report = run_compare(tmp_path / "a", default_checkpoint(), CompareOptions(progress=False, max_new_tokens=16))
    assert abs(_check(report, "perplexity_delta_pct")) <= 0.15
    assert _check(report, "top1_agreement") >= 0.98
    assert report["passed"]


def test_gptq_and_awq_beat_rtn_on_the_trained_model(fp32, tmp_path):
    """Mean KL against PyTorch fp32 on the embedded held-out text: both activation-aware methods under rtn's."""
    kl = {}
    for method in ("rtn", "gptq", "awq"):
        manifest = calibrate_artifact(fp32, tmp_path / method, int4(method=method), **QUIET)
        if method == "awq":
            assert manifest["quantization"]["awq_layernorms"] == 12  # the final LayerNorm feeds the 8-bit LM head only
        report = run_compare(tmp_path / method, default_checkpoint(), CompareOptions(progress=False, max_new_tokens=4))
        kl[method] = report["teacher_forced"]["kl_mean"]
    assert kl["gptq"] < 0.8 * kl["rtn"] and kl["awq"] < 0.8 * kl["rtn"], kl




def _logits(model, ids):
    options = ort.SessionOptions()  # ONNX Runtime fuses DQ -> MatMul into MatMulNBits; float products there too
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    layers = sum(1 for i in sess.get_inputs() if i.name.endswith(".key"))
    past = next(i for i in sess.get_inputs() if i.name == io.past_key(0))
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    feeds = io.prompt_feeds(ids, np.ones_like(ids), pos, layers, past.shape[1], past.shape[3],
                            "float16" if "16" in past.type else "float32",
                            static=any(i.name == io.WRITE_INDICES for i in sess.get_inputs()))
    return sess.run([io.LOGITS], feeds)[0].astype(np.float32)


@pytest.mark.parametrize("lm_head", ["int8", "int4"])
def test_the_tensorrt_form_agrees_with_matmulnbits_on_onnx_runtime(fp32, tmp_path, lm_head):
    """tensorrt_ready turns MatMulNBits into INT4 DequantizeLinear (block on K) -> MatMul; check_tensorrt_support
    accepts it, and on ONNX Runtime CPU it gives the MatMulNBits logits (accuracy level 0: float products)."""
    calibrate_artifact(fp32, tmp_path / "r", int4(method="rtn", accuracy_level=0, lm_head=lm_head), **QUIET)
    model = onnx.load(str(tmp_path / "r" / io.MODEL_FILE))
    trt = tensorrt_ready(model)
    assert check_tensorrt_support(trt) == []
    dq = [n for n in trt.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == (25 if lm_head == "int4" else 24) and "MatMulNBits" not in {n.op_type for n in trt.graph.node}
    inits = {t.name: t for t in trt.graph.initializer}
    assert {inits[n.input[0]].data_type for n in dq} == {onnx.TensorProto.INT4}
    ids = np.array([[510, 1375, 273, 253, 6398, 310]], np.int64)
    a, b = _logits(model, ids), _logits(trt, ids)
    assert np.abs(a - b).max() < 1e-3, np.abs(a - b).max()
    assert any("MatMulNBits" in p for p in check_tensorrt_support(model))  # the ORT form itself is not TensorRT's


def _planted(fp32, folder, by=30.0, channels=(3, 7, 40, 77)):
    """The default model with loud LayerNorm output channels in every layer (weights' rows scaled back: the
    same function in fp32), as real LLMs' activations have."""
    folder.mkdir()
    for f in fp32.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    model = onnx.load(str(folder / io.MODEL_FILE))
    inits = {t.name: t for t in model.graph.initializer}

    def scale(name, index, factor):
        a = numpy_helper.to_array(inits[name]).copy()
        a[index] *= factor
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    idx = list(channels)
    for i in range(6):
        for ln, w in (("input_layernorm", "attention.query_key_value"), ("post_attention_layernorm", "mlp.dense_h_to_4h")):
            scale(f"gpt_neox.layers.{i}.{ln}.weight", idx, by)
            scale(f"gpt_neox.layers.{i}.{ln}.bias", idx, by)
            scale(f"gpt_neox.layers.{i}.{w}.weight", (idx, slice(None)), 1 / by)
    onnx.save(model, str(folder / io.MODEL_FILE))
    manifest = json.loads((folder / "manifest.json").read_text())
    files = list(manifest.pop("files"))
    write_manifest(folder, "export", {k: v for k, v in manifest.items() if k not in ("toolkit", "toolkit_version", "stage")},
                   files)
    return folder


def test_awq_and_gptq_beat_rtn_on_planted_activation_outliers(fp32, tmp_path):
    loud = _planted(fp32, tmp_path / "loud")
    kl = {}
    for method in ("rtn", "awq", "gptq"):
        calibrate_artifact(loud, tmp_path / method, int4(method=method, samples=16, seq_len=64, lm_head="float"), **QUIET)
        report = run_compare(tmp_path / method, default_checkpoint(), CompareOptions(progress=False, windows=6,
                                                                                       max_new_tokens=8))
        kl[method] = report["teacher_forced"]["kl_mean"]
    assert kl["awq"] <= kl["rtn"] / 3 and kl["gptq"] <= kl["rtn"] / 3, kl


def test_fp16_and_external_data_sources(tmp_path):
    """An fp16 export (LayerNorm -> Cast -> MatMul: awq folds through the Cast) and an export whose weights are
    all in model.onnx.data (read by memmap) both quantize and run."""
    fp16 = tmp_path / "fp16"
    export_checkpoint(default_checkpoint(), fp16, ExportOptions(dtype="fp16", external_data_threshold=0),
                      log=lambda *_: None)
    assert (fp16 / io.WEIGHTS_FILE).is_file()
    manifest = calibrate_artifact(fp16, tmp_path / "a", int4(method="awq", samples=4, seq_len=32), **QUIET)
    assert manifest["quantization"]["awq_layernorms"] == 12
    report = run_compare(tmp_path / "a", default_checkpoint(), CompareOptions(progress=False, windows=4, max_new_tokens=8))
    assert _check(report, "top1_agreement") >= 0.95


def test_bad_input_is_one_line_exit_2_and_nothing_written(fp32, tmp_path, capsys):
    calibrate_artifact(fp32, tmp_path / "done", int4(method="rtn"), **QUIET)
    cases = [
        ([str(fp32), "OUT", "--weights-only", "--bits", "3"], "--bits must be 4 or 8, got 3"),
        ([str(fp32), "OUT", "--bits", "4"], "--bits 4 needs --weights-only"),
        ([str(fp32), "OUT", "--weights-only", "--bits", "4", "--block-size", "256"],
         "--block-size 256 does not divide K = 128 of weight"),
        ([str(fp32), "OUT", "--weights-only", "--bits", "4", "--block-size", "48"], "--block-size must be one of"),
        ([str(fp32), "OUT", "--weights-only", "--bits", "4", "--method", "entropy"], "--method with --bits 4 must be"),
        ([str(tmp_path / "done"), "OUT", "--weights-only", "--bits", "4"], "expected stage export, found 'calibrate'"),
    ]
    assert_refused("calibrate", cases, tmp_path, capsys)


# run in a fresh child started from this test process, which reports its own peak anonymous memory
QUANTIZE_PEAK = POLL_ANON + """
import sys
from neoxrt.calibration.calibrate import calibrate_artifact
from neoxrt.calibration.options import CalibrationOptions
options = CalibrationOptions(weights_only=True, bits=4, method=sys.argv[3], samples=4, seq_len=32)
calibrate_artifact(sys.argv[1], sys.argv[2], options, threads=1, progress=False, log=lambda *_: None)
print(peak_anon[0])
"""


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_streamed_quantization_peak_does_not_grow_with_depth(tmp_path, method):
    """fp16 exports of 2 and 16 layers (weights in model.onnx.data), each quantized in a fresh child that
    reports its own peak anonymous memory: 14 more layers add 14 x 6.3 MB of fp16 weights (and, for gptq and awq,
    14 x 4 X^T X matrices (512 or 2048 wide) of float32, 14 x 21 MB: the statistics are gathered and used one layer
    at a time, as the writer reaches the layer), the peak must not follow."""
    base = dict(VARIANTS["gelu_parallel"].to_dict(), hidden_size=512, intermediate_size=2048, num_heads=8, vocab_size=50304)
    peaks, weights = {}, {}
    for layers in (2, 16):
        config = type(VARIANTS["gelu_parallel"])(**{**base, "num_layers": layers})
        ckpt = save_checkpoint(random_model(config), tmp_path / f"ckpt{layers}")
        (ckpt / "tokenizer.json").write_bytes((default_checkpoint() / "tokenizer.json").read_bytes())
        art = tmp_path / f"fp16-{layers}"
        export_checkpoint(ckpt, art, ExportOptions(dtype="fp16", external_data_threshold=0), log=lambda *_: None)
        weights[layers] = (art / io.WEIGHTS_FILE).stat().st_size
        done = subprocess.run([sys.executable, "-c", QUANTIZE_PEAK, str(art), str(tmp_path / f"int4-{layers}"), method],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[layers] = int(done.stdout.split()[-1])
    grown = peaks[16] - peaks[2]
    assert grown < 0.25 * (weights[16] - weights[2]), (peaks, weights)
