"""Logic of the llama.cpp and INT4 speed benches that runs without llama.cpp: per-pass ratios, weight bytes."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from neoxrt.bench.int4_speed import weight_bytes, with_accuracy_level
from neoxrt.bench.llamacpp import markdown, summarise


def test_summarise_takes_the_median_of_per_pass_ratios():
    # per pass (ours / llama.cpp): decode 1.0, 2.0, 0.5; prompt 2, 2, 0.5
    rows = {"fp32/f32@128": {"ours": [(10, 1.0), (10, 4.0), (10, 1.0)], "llamacpp": [(5, 1.0), (5, 2.0), (20, 2.0)]}}
    (line,) = summarise(rows)
    assert line["decode_ratio"] == 1.0  # ratios 1.0, 2.0, 0.5
    assert line["prompt_ratio"] == 2.0  # ratios 2, 2, 0.5
    assert line["ours_decode_ms"] == 1.0 and line["llamacpp_decode_ms"] == 2.0
    assert "| fp32/f32@128 | 1.00 |" in markdown({"m": [line]}, 3, 2)


def _model(path, nbits: bool):
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    emb = numpy_helper.from_array(np.ones((16, 8), np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"])]
    if nbits:
        packed = numpy_helper.from_array(np.zeros((4, 1, 4), np.uint8), "q")
        scales = numpy_helper.from_array(np.ones(4, np.float32), "s")
        nodes.append(helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=8, N=4,
                                      bits=4, block_size=8, accuracy_level=4))
        inits = [emb, packed, scales]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
        inits = [emb, w]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    path.mkdir()
    onnx.save(helper.make_model(graph), str(path / "model.onnx"))
    (path / "manifest.json").write_text("{}")
    return path


def test_weight_bytes_counts_matmul_weights_not_the_embedding(tmp_path):
    assert weight_bytes(_model(tmp_path / "f", nbits=False)) == 8 * 4 * 4
    assert weight_bytes(_model(tmp_path / "q", nbits=True)) == 16 + 16


def test_accuracy_level_copy_changes_only_that_attribute(tmp_path):
    src = _model(tmp_path / "int4", nbits=True)
    out = with_accuracy_level(src, 0)
    node = next(n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 0
    assert (out / "manifest.json").is_file() and weight_bytes(out) == weight_bytes(src)
