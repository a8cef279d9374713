"""Range selection, weight quantisation, SmoothQuant folding and Q/DQ placement, each on its own."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from neox_testing import default_checkpoint, ort_session
from neoxrt.calibration.qdq import QMAX, nbits_block_size, qdq_from_onnx, quantize_weight
from neoxrt.calibration.ranges import BINS, choose_threshold
from neoxrt.calibration.smoothquant import fold_factors, group_factors, smoothing_factors
from neoxrt.calibration.targets import quant_targets, smooth_groups
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions


def _hist(x):
    a = np.abs(x)
    return float(a.max()), np.histogram(a, bins=BINS, range=(0, a.max()))[0]


def test_minmax_is_absmax_and_percentile_cuts_rare_outliers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [60.0, -80.0]])  # two outliers far past the bulk
    absmax, hist = _hist(x)
    assert choose_threshold("minmax", absmax, hist, 99.99) == pytest.approx(80.0)
    pct = choose_threshold("percentile", absmax, hist, 99.99)
    assert 3.0 < pct < 6.0, pct  # 99.99th percentile of |N(0,1)| is ~3.9


def test_entropy_clips_a_heavy_tail():
    x = np.random.default_rng(0).laplace(0, 1, 400_000)  # max |x| ~ 13, most mass below 5
    absmax, hist = _hist(x)
    ent = choose_threshold("entropy", absmax, hist, 99.99)
    assert 3.0 < ent < 0.9 * absmax, (ent, absmax)  # measured 10.5 of 13.5


def test_entropy_keeps_the_range_of_a_uniform_distribution():
    x = np.random.default_rng(1).uniform(-4, 4, 200_000)
    absmax, hist = _hist(x)
    assert choose_threshold("entropy", absmax, hist, 99.99) > 0.9 * absmax


def test_weight_quantisation_is_per_output_channel_and_within_half_a_step():
    w = np.random.default_rng(2).normal(0, 1, (64, 48)).astype(np.float32)
    w[:, 3] *= 100  # one loud output channel must not coarsen the others
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and scale.shape == (48,)
    assert np.abs(q).max() <= QMAX
    err = np.abs(q * scale - w)
    assert np.all(err <= scale / 2 + 1e-6)
    assert scale[0] < scale[3] / 50


def test_smoothing_factors_follow_the_formula():
    s = smoothing_factors(np.array([16.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0]), 0.5)
    np.testing.assert_allclose(s, [4.0, 0.5, 1.0])


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("qdq") / "fp32"
    export_checkpoint(default_checkpoint(), out, ExportOptions(attention="decomposed"), log=lambda *_: None)
    return onnx.load(str(out / "model.onnx"))


def _logits(model, ids):
    sess = ort_session(model, "decomposed")
    from neoxrt import contract as io

    past = next(i for i in sess.get_inputs() if i.name == io.past_key(0))
    layers = sum(1 for i in sess.get_inputs() if i.name.endswith(".key"))
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    feeds = io.prompt_feeds(ids, np.ones_like(ids), pos, layers, past.shape[1], past.shape[3], "float32")
    return sess.run([io.LOGITS], feeds)[0]


def test_smoothquant_folding_leaves_the_fp32_function_unchanged(fp32_model):
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    targets = quant_targets(model)
    groups = smooth_groups(model, targets)
    # GPT-NeoX: input_layernorm -> QKV and post_attention_layernorm -> MLP per layer, final_layer_norm -> LM head
    assert len(groups) == 2 * 6 + 1
    rng = np.random.default_rng(3)
    absmax = {g.activation: rng.uniform(0.1, 20, 128).astype(np.float32) for g in groups}
    factors = group_factors(model, groups, absmax, 0.5)
    assert all(not np.allclose(s, 1.0) for s in factors.values())
    fold_factors(model, groups, factors)
    ids = np.array([[5, 17, 33, 2, 90, 41, 7, 300]], np.int64)
    np.testing.assert_allclose(_logits(model, ids), _logits(fp32_model, ids), atol=2e-4)


def test_qdq_placement_is_what_tensorrt_explicit_quantization_expects(fp32_model):
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    targets = quant_targets(model)
    # 4 projections per layer + the LM head; attention's Q.K^T and P.V (no weights) are not targets
    assert len(targets) == 4 * 6 + 1
    qdq_from_onnx(model, targets, {t.activation: 2.0 for t in targets})
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if getattr(producer.get(n.input[1]), "op_type", "") == "DequantizeLinear"]
    assert len(quantized) == len(targets)
    for node in quantized:
        wdq, xdq = producer[node.input[1]], producer[node.input[0]]
        assert inits[wdq.input[0]].dtype == np.int8 and inits[wdq.input[1]].ndim == 1
        assert next(a.i for a in wdq.attribute if a.name == "axis") == 1  # per output channel of W [K, N]
        assert xdq.op_type == "DequantizeLinear" and producer[xdq.input[0]].op_type == "QuantizeLinear"
        assert inits[xdq.input[1]].ndim == 0 and inits[xdq.input[2]].dtype == np.int8 and inits[xdq.input[2]] == 0
    for node in matmuls:
        if node not in quantized:  # attention products stay float
            assert producer[node.input[0]].op_type != "DequantizeLinear"
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.name.endswith(".weight")
                   and "dense" in i.name for i in model.graph.initializer)


def test_weights_only_leaves_activations_in_float(fp32_model):
    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    qdq_from_onnx(model, quant_targets(model), None, weights_only=True)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 25
    ids = np.array([[5, 17, 33, 2, 90, 41, 7, 300]], np.int64)
    ref, got = _logits(fp32_model, ids), _logits(model, ids)
    assert np.abs(got - ref).max() < 0.5
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_nbits_block_is_the_largest_that_divides_every_inner_dimension():
    assert nbits_block_size([768, 3072]) == 256  # Pythia-160m
    assert nbits_block_size([128, 512]) == 128  # Pythia-14m
    assert nbits_block_size([96, 768]) == 32
    assert nbits_block_size([48]) == 16
    assert nbits_block_size([100]) is None  # no kernel block divides it: ONNX Runtime keeps its default
