"""ONNX Runtime (CPU) runs every export flavour and matches our PyTorch model over a prompt step and 16
decode steps, on the trained default model and on every variant of the support table."""

import numpy as np
import pytest
import torch

from neox_testing import PROMPTS, VARIANTS, default_checkpoint, ort_session, step_pairs
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.neox_onnx import onnx_from_model
from neoxrt.export.options import ExportOptions
from neoxrt.model import load_model, random_model

LOGITS_ATOL = 1e-4
PRESENTS_ATOL = 1e-5  # same arithmetic, different matmul kernels
FP16_LOGITS_ATOL = 0.05  # documented fp16 tolerance against fp32 (docs/export.md)
DECODE_STEPS = 16
FLAVOURS = ["decomposed", "fused", "plugin"]


def _check_fp32(session, model):
    for step, mask, ort_logits, torch_logits, ort_past, torch_past in step_pairs(session, model, PROMPTS, DECODE_STEPS):
        rows = mask[:, -ort_logits.shape[1]:].numpy().astype(bool)
        err = np.abs(ort_logits - torch_logits)[rows].max()
        assert err <= LOGITS_ATOL, f"step {step}: logits max abs {err}"
        # cache slots of padding tokens are never attended to; their contents are not part of the contract
        keys = mask.numpy().astype(bool)  # [B, T]
        for layer, ((ok, ov), (tk, tv)) in enumerate(zip(ort_past, torch_past)):
            assert ok.shape == tk.shape
            assert np.abs(ok - tk).transpose(0, 2, 1, 3)[keys].max() <= PRESENTS_ATOL, f"step {step} layer {layer} key"
            assert np.abs(ov - tv).transpose(0, 2, 1, 3)[keys].max() <= PRESENTS_ATOL, f"step {step} layer {layer} value"


@pytest.mark.parametrize("attention", FLAVOURS)
def test_trained_default_artifact_matches_pytorch(attention, tmp_path):
    options = ExportOptions(attention=attention, kv_cache="dynamic")
    export_checkpoint(default_checkpoint(), tmp_path / "art", options, log=lambda *_: None)
    _check_fp32(ort_session(tmp_path / "art" / "model.onnx", attention), load_model(default_checkpoint()))


@pytest.mark.parametrize("attention", FLAVOURS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_pytorch(name, attention):
    model = random_model(VARIANTS[name], seed=1)
    _check_fp32(ort_session(onnx_from_model(model, ExportOptions(attention=attention, kv_cache="dynamic")), attention), model)


@pytest.mark.parametrize("name", ["gelu_parallel", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"])
def test_gelu_is_one_node_from_opset_20(name):
    """The parity tests above run both forms; this pins which one each opset gets."""
    model = random_model(VARIANTS[name], seed=1)
    layers = VARIANTS[name].num_layers
    for opset, gelus in ((17, 0), (20, layers), (23, layers)):
        graph = onnx_from_model(model, ExportOptions(attention="decomposed", opset=opset)).graph
        nodes = [n for n in graph.node if n.op_type == "Gelu"]
        assert len(nodes) == gelus, opset
        assert all(a.s.decode() == ("none" if name == "gelu_parallel" else "tanh") for n in nodes for a in n.attribute)
        assert any(n.op_type in ("Erf", "Tanh") for n in graph.node) == (gelus == 0)


@pytest.mark.parametrize("attention", ["decomposed", "fused"])
def test_fp16_is_close_to_fp32_and_finite(attention):
    model = load_model(default_checkpoint())
    session = ort_session(onnx_from_model(model, ExportOptions(attention=attention, dtype="fp16", kv_cache="dynamic")))
    for step, mask, ort_logits, torch_logits, ort_past, _ in step_pairs(session, model, PROMPTS, DECODE_STEPS, "float16"):
        assert np.isfinite(ort_logits).all() and all(np.isfinite(k).all() for k, _ in ort_past)
        rows = mask[:, -ort_logits.shape[1]:].numpy().astype(bool)
        err = np.abs(ort_logits - torch_logits)[rows].max()
        assert err <= FP16_LOGITS_ATOL, f"step {step}: fp16 logits max abs {err}"


def test_fp16_survives_attention_scores_beyond_fp16_range():
    """q.k past 65504 overflows an all-fp16 attention; our fp16 graph keeps scores in fp32."""
    model = random_model(VARIANTS["gelu_parallel"], seed=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.qkv.weight.mul_(600.0)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        _, (first, *_) = model(ids, torch.arange(6)[None], torch.ones_like(ids), model.empty_past(1))
        assert first[0].abs().max() ** 2 * model.config.head_dim > 65504  # the scores do overflow fp16
    session = ort_session(onnx_from_model(model, ExportOptions(dtype="fp16", kv_cache="dynamic")))
    for _, _, ort_logits, torch_logits, _, _ in step_pairs(session, model, [[3, 4, 5, 6, 7, 8]], 4, "float16"):
        assert np.isfinite(ort_logits).all()
        assert np.abs(ort_logits - torch_logits).max() <= FP16_LOGITS_ATOL * 4
