"""--lm-head screened: an INT8 copy of the LM head bounds every logit, the tokens that can be the largest are
recomputed in fp32. Greedy tokens and the largest logit are the exact head's; every logit is within the bound."""

import json

import numpy as np
import onnx
import pytest
import torch

from neox_testing import VARIANTS, assert_refused, default_checkpoint, ort_session, write_variant
from neoxrt import contract as io
from neoxrt.errors import ExportError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.export.screen import screen_constants
from neoxrt.export.tensorrt_graph import check_tensorrt_support, tensorrt_ready
from neoxrt.model import random_model, save_checkpoint
from neoxrt.runtime import Generator

QUIET = dict(log=lambda *_: None)


def _pair(ckpt, root, **options):
    exact, screened = root / "exact", root / "screened"
    options = {"kv_cache": "dynamic", **options}  # _run feeds the dynamic contract
    export_checkpoint(ckpt, exact, ExportOptions(**options), **QUIET)
    export_checkpoint(ckpt, screened, ExportOptions(lm_head="screened", **options), **QUIET)
    return exact, screened


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _pair(default_checkpoint(), tmp_path_factory.mktemp("screen"), logits="last")


@pytest.fixture(scope="module")
def near_ties(tmp_path_factory):
    """A random model whose LM head rows come in groups of 8 near-copies (1e-4 apart: inside the INT8 copy's
    rounding), so the screen cannot separate them and must recompute whole groups in fp32."""
    root = tmp_path_factory.mktemp("ties")
    model = random_model(VARIANTS["gelu_parallel"], seed=5)
    with torch.no_grad():
        w = model.lm_head.weight
        base = w[::8].repeat_interleave(8, dim=0)[: w.shape[0]]
        w.copy_(base + 1e-4 * torch.randn_like(base))
    return _pair(save_checkpoint(model, root / "ckpt"), root, logits="all")


def _run(path, ids, mask, pos):
    session = ort_session(path / io.MODEL_FILE, "fused")
    feeds = io.prompt_feeds(ids, mask, pos, 2, 4, 16, "float32")
    return session.run([io.LOGITS], feeds)[0]


def test_greedy_tokens_are_the_exact_heads(trained):
    prompts = ["The state of the Union is", "Gentlemen of the Senate and the House", "We"]
    a, b = (Generator.from_artifacts(p).generate(prompts, max_new_tokens=48).ids for p in trained)
    assert a == b


def test_every_logit_is_within_its_bound_and_the_largest_is_exact(near_ties):
    ids = np.array([[1, 1, 5, 17, 33, 2], [12, 3, 64, 65, 66, 67]], np.int64)
    mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int64)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    exact, screened = (_run(p, ids, mask, pos) for p in near_ties)
    assert exact.shape == screened.shape
    np.testing.assert_array_equal(exact.argmax(-1), screened.argmax(-1))
    np.testing.assert_allclose(screened.max(-1), exact.max(-1), atol=1e-5)
    # recomputed tokens carry fp32 values: at least the whole group of the best token at every position
    recomputed = np.isclose(screened, exact, rtol=0, atol=1e-5)
    best = exact.argmax(-1)
    for b, s in np.ndindex(best.shape):
        group = slice(best[b, s] // 8 * 8, best[b, s] // 8 * 8 + 8)
        assert recomputed[b, s, group].all()
    assert not recomputed.all()  # and the rest are the INT8 copy's, not recomputed


@pytest.mark.parametrize("block", [16, 64])
def test_the_bound_holds_for_onnx_runtimes_int8_products(block, tmp_path):
    """screen_constants' bound against ONNX Runtime's own MatMulNBits (the INT8 copy as DequantizeLinear ->
    MatMul, fused with activations quantized per block at its default accuracy level), activations with an
    outlier channel: |approx - exact| <= e for every token."""
    from onnx import TensorProto, helper, numpy_helper

    from neoxrt.calibration.qdq import ORT_NBITS_BLOCK_KEY
    from neoxrt.runtime.ort_session import OrtSession

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (512, 64)).astype(np.float32)
    c = screen_constants(w)
    inits = [numpy_helper.from_array(c["int8"], "q"), numpy_helper.from_array(c["scale"], "s"),
             numpy_helper.from_array(np.zeros_like(c["scale"], np.int8), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "screen", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(tmp_path / "screen.onnx"))
    session = OrtSession(tmp_path / "screen.onnx", config={ORT_NBITS_BLOCK_KEY: str(block)})
    x = rng.normal(0, 1, (32, 64)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel
    approx = session.sess.run(["y"], {"x": x})[0]
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = np.stack([np.abs(x).sum(-1), np.abs(x).max(-1)], -1) @ c["bound"]
    assert np.abs(approx - exact).max() > 1e-3  # the INT8 path really ran
    assert np.all(np.abs(approx - exact) <= bound)
    assert np.median(bound) < 0.5 * np.std(exact)  # and the bound is tight enough to screen


def test_compare_proves_the_screened_head_on_its_own_thresholds(trained):
    """neoxrt compare holds a screened artifact to fp32 on the largest logit and the tokens, and to the screen's
    bound on the rest; fp32's own logits threshold would fail it (the INT8 copy's tail)."""
    from neoxrt.report.compare import CompareOptions, run_compare
    from neoxrt.report.thresholds import DEFAULTS

    report = run_compare(trained[1], default_checkpoint(), CompareOptions(progress=False, windows=4, max_new_tokens=8))
    checks = {c["name"]: c["value"] for c in report["checks"]}
    assert report["passed"] and report["thresholds"] == "fp32-screened"
    assert checks["top_logit_max_abs"] <= 1e-5 and checks["greedy_match_fraction"] == 1.0
    assert checks["logits_max_abs"] > DEFAULTS["fp32"]["logits_max_abs"][1]


def test_manifest_and_tensorrt_form(trained):
    manifest = json.loads((trained[1] / io.MANIFEST_FILE).read_text())
    assert manifest["export_options"]["lm_head"] == "screened"
    ops = [n.op_type for n in onnx.load(str(trained[1] / io.MODEL_FILE)).graph.node]
    assert {"NonZero", "ScatterElements", "DequantizeLinear"} <= set(ops)
    assert check_tensorrt_support(tensorrt_ready(onnx.load(str(trained[1] / io.MODEL_FILE)))) == []


@pytest.mark.parametrize("options", [{"attention": "decomposed"}, {"kv_cache": "static"}],
                         ids=["decomposed-opset17", "static-opset24"])
def test_every_flavour_and_opset_takes_the_screen(trained, tmp_path, options):
    """ReduceMax takes its axes as an attribute before opset 18: the screen is emitted for the graph's opset."""
    out = tmp_path / "screened"
    export_checkpoint(default_checkpoint(), out, ExportOptions(logits="last", lm_head="screened", **options), **QUIET)
    prompts = ["The state of the Union is", "Gentlemen of the Senate"]
    a, b = (Generator.from_artifacts(p).generate(prompts, max_new_tokens=16).ids for p in (trained[0], out))
    assert a == b


def test_tied_embeddings_screen_the_embedding(tmp_path):
    ckpt = write_variant("tied_embeddings", tmp_path / "ckpt")
    exact, screened = _pair(ckpt, tmp_path, logits="last")
    prompts = [[5, 17, 33, 2, 90, 41, 7], [12, 3]]
    a, b = (Generator.from_artifacts(p).generate(prompts, max_new_tokens=12, ignore_eos=True).ids
            for p in (exact, screened))
    assert a == b


def test_calibrate_refuses_a_screened_source(trained, tmp_path, capsys):
    assert_refused("calibrate", [([str(trained[1]), "OUT", "--weights-only"], "has a screened LM head"),
                                 ([str(trained[1]), "OUT", "--weights-only", "--bits", "4"], "has a screened LM head")],
                   tmp_path, capsys)


def test_screened_needs_fp32_and_the_causal_lm(tmp_path, capsys):
    with pytest.raises(ExportError, match="--lm-head screened needs --dtype fp32"):
        ExportOptions(lm_head="screened", dtype="fp16")
    with pytest.raises(ExportError, match="--lm-head must be one of exact, screened"):
        ExportOptions(lm_head="int8")
    assert_refused("export", [([str(default_checkpoint()), "OUT", "--lm-head", "screened", "--dtype", "fp16"],
                               "--lm-head screened needs --dtype fp32")], tmp_path, capsys)


def test_screen_constants_are_the_same_a_block_of_rows_at_a_time(monkeypatch):
    import neoxrt.export.screen as screen

    w = np.random.default_rng(1).normal(0, 0.02, (screen.ROWS + 100, 16)).astype(np.float32)
    blocked = screen_constants(w)
    monkeypatch.setattr(screen, "ROWS", len(w))
    whole = screen_constants(w)
    assert blocked["int8"].shape == (16, len(w))
    for key in whole:
        np.testing.assert_array_equal(blocked[key], whole[key])
