"""The graph we hand to TensorRT, and a static check of it against onnx-tensorrt's operator support list.

`tensorrt_ready(model)`: ONNX Attention-23 nodes that take the KV cache (past_key/past_value inputs,
present outputs) are rewritten to concatenate the cache outside the node, the form TensorRT's ONNX parser
imports (it rejects Attention's cache inputs and outputs, docs/operators.md). Same function, tested on ONNX
Runtime; the artifact itself keeps the cache inside Attention, which ONNX Runtime runs faster.

    past_key --+                                 past_key --Concat(k)--> present_key --+
    k ---------Attention(q, k, v, mask, past)    =>                                    Attention(q, K, V, mask)
    past_value-+   -> (y, present_key, ...)      past_value --Concat(v)--> present_value -+

3-D Attention (q, k, v [B,S,H*D] with q_num_heads/kv_num_heads, the fused export's form) becomes 4-D, the
only form the parser takes: q, k, v --Reshape [0,0,H,-1], Transpose--> [B,H,S,D], and the output back with
Transpose, Reshape [0,0,-1].

`check_tensorrt_support(model)` lists every reason the parser would refuse the graph: an op it does not
import, an opset outside its range, and the restrictions we can check statically (Attention cache I/O,
Q/DQ zero points, LayerNormalization extra outputs, RotaryEmbedding position type, unregistered custom ops).
The list is data (`data/onnx_tensorrt_operators.json`) with its source and the TensorRT version it describes.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np
import onnx
from onnx import helper, numpy_helper

from neoxrt.export.graph import required_inputs

SUPPORT_FILE = "onnx_tensorrt_operators.json"


@lru_cache(maxsize=1)
def support_table() -> dict:
    return json.loads(resources.files("neoxrt.export").joinpath("data", SUPPORT_FILE).read_text(encoding="utf-8"))


def tensorrt_ready(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose Attention nodes take the whole K/V (cache concatenated before the node), whose
    inputs with a default are constants, and whose INT4 MatMulNBits (neoxrt calibrate --bits 4) are INT4
    DequantizeLinear (block on K) -> MatMul."""
    from neoxrt.calibration.int4 import dq_from_matmulnbits

    out = onnx.ModelProto()
    out.CopyFrom(model)
    dq_from_matmulnbits(out)
    kept = required_inputs(out.graph)  # inputs with a default (logits_to_keep) become constants: every position's logits
    del out.graph.input[:]
    out.graph.input.extend(kept)
    nodes = []
    for node in out.graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        heads = {a.name: a.i for a in node.attribute if a.name in HEAD_ATTRIBUTES}
        q, k, v, mask = (list(node.input) + [""] * 4)[:4]
        y = node.output[0]
        if heads:  # 3-D q, k, v: to [B,H,S,D]; the output back to [B,S,H*D] below
            q, k, v = (_to_heads(nodes, out.graph, node.name, x, heads[attr]) for x, attr in
                       ((q, "q_num_heads"), (k, "kv_num_heads"), (v, "kv_num_heads")))
            y = f"{node.name}/Y4"
        if len(node.input) >= 6:  # the cache concatenated outside the node
            past_k, past_v = node.input[4:6]
            present_k = node.output[1] if len(node.output) > 1 and node.output[1] else f"{node.name}/present_key"
            present_v = node.output[2] if len(node.output) > 2 and node.output[2] else f"{node.name}/present_value"
            nodes.append(helper.make_node("Concat", [past_k, k], [present_k], name=f"{node.name}/ConcatKey", axis=2))
            nodes.append(helper.make_node("Concat", [past_v, v], [present_v], name=f"{node.name}/ConcatValue", axis=2))
            k, v = present_k, present_v
        elif not heads:
            nodes.append(node)
            continue
        attention = helper.make_node("Attention", [q, k, v, mask], [y], name=node.name)
        attention.attribute.extend(a for a in node.attribute if a.name not in HEAD_ATTRIBUTES)
        nodes.append(attention)
        if heads:
            merged = helper.make_node("Transpose", [y], [f"{node.name}/Y4t"], name=f"{node.name}/MergeT", perm=[0, 2, 1, 3])
            nodes += [merged, helper.make_node("Reshape", [merged.output[0], _const(out.graph, "neoxrt.shape_0_0_m1",
                                                                                       [0, 0, -1])],
                                               [node.output[0]], name=f"{node.name}/Merge")]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


HEAD_ATTRIBUTES = ("q_num_heads", "kv_num_heads")


def _const(graph: onnx.GraphProto, name: str, values: list[int]) -> str:
    """An int64 initializer `name` (added once)."""
    if not any(t.name == name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def _to_heads(nodes: list, graph: onnx.GraphProto, prefix: str, x: str, heads: int) -> str:
    """x [B,S,H*D] -> [B,H,S,D] (Reshape, Transpose) appended to `nodes`."""
    split = helper.make_node("Reshape", [x, _const(graph, f"neoxrt.shape_0_0_{heads}_m1", [0, 0, heads, -1])],
                             [f"{prefix}/{x}/heads"], name=f"{prefix}/{x}/Reshape")
    nodes += [split, helper.make_node("Transpose", [split.output[0]], [f"{prefix}/{x}/bhsd"],
                                      name=f"{prefix}/{x}/Transpose", perm=[0, 2, 1, 3])]
    return nodes[-1].output[0]


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _zero_points(model: onnx.ModelProto):
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            yield node, None if zp is None else numpy_helper.to_array(zp)


def check_tensorrt_support(model: onnx.ModelProto, plugins: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Reasons TensorRT's ONNX parser (the version in the support table) would refuse `model`; [] if none.

    Args:
        plugins: (domain, op_type) pairs of custom ops that a registered plugin provides.
    """
    table = support_table()
    ops, version = table["operators"], table["tensorrt"]
    problems = []
    opset = _default_opset(model)
    if not table["opset_min"] <= opset <= table["opset_max"]:
        problems.append(f"opset {opset} is outside TensorRT {version}'s range {table['opset_min']}..{table['opset_max']}")
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    seen = set()
    for node in model.graph.node:
        where = f"{node.op_type} ({node.name or 'unnamed'})"
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) not in plugins:
                problems.append(f"{where}: custom op {node.domain}::{node.op_type} has no registered TensorRT plugin")
            continue
        row = ops.get(node.op_type)
        if row is None or not row["supported"]:
            if node.op_type not in seen:
                problems.append(f"{node.op_type}: not imported by TensorRT {version}'s ONNX parser")
            seen.add(node.op_type)
            continue
        if node.op_type == "Attention" and any(a.name in HEAD_ATTRIBUTES for a in node.attribute):
            problems.append(f"{where}: TensorRT {version} takes 4-D Q, K, V only, not 3-D with q_num_heads "
                            "(run tensorrt_ready first)")
        if node.op_type == "Attention" and (len(node.input) > 4 or len([o for o in node.output if o]) > 1):
            problems.append(f"{where}: TensorRT {version} does not import Attention's past_key/past_value inputs or "
                            "present outputs (run tensorrt_ready first)")
        if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            problems.append(f"{where}: only LayerNormalization's first output is supported")
        if node.op_type == "RotaryEmbedding" and len(node.input) > 3 and node.input[3] in inputs \
                and inputs[node.input[3]] != onnx.TensorProto.INT64:
            problems.append(f"{where}: position_ids must be INT64")
    for node, zp in _zero_points(model):
        if zp is None or np.any(zp != 0):
            problems.append(f"{node.op_type} ({node.name}): zero point must be a zero initializer for TensorRT")
        elif zp.dtype != np.int8 and str(zp.dtype) != "int4":
            problems.append(f"{node.op_type} ({node.name}): zero point type {zp.dtype} (TensorRT quantizes to int8, "
                            "or int4 weights)")
    return problems
