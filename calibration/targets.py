"""What gets quantized: every MatMul whose second input is a 2-D fp32 weight initializer (the QKV, dense,
MLP and LM-head projections). Attention's own products (Q.K^T, P.V) have no weights and stay in float, so
TensorRT's attention fusion and ONNX Runtime's Attention kernels are left intact.

SmoothQuant groups: a LayerNormalization with initializer scale and bias whose output feeds only target
MatMuls (GPT-NeoX: input_layernorm -> QKV, post_attention_layernorm -> MLP in, final_layer_norm -> LM head).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class Target:
    node: str  # MatMul node name
    activation: str  # its input 0
    weight: str  # its input 1 (initializer [K, N])


@dataclass(frozen=True)
class SmoothGroup:
    activation: str  # the LayerNormalization output
    scale: str  # LN scale initializer
    bias: str  # LN bias initializer
    weights: tuple[str, ...]  # weights of the MatMuls it feeds


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def quant_targets(model: onnx.ModelProto, dtypes: tuple[int, ...] = (onnx.TensorProto.FLOAT,)) -> list[Target]:
    """Every MatMul reading a 2-D initializer of one of `dtypes` that no other node reads (fp32 for INT8; fp32
    and fp16 for INT4 weights-only)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    out = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if w.data_type not in dtypes or len(w.dims) != 2 or len(users[w.name]) != 1:
            continue  # other weight types, batched weights or weights shared with another op stay as they are
        out.append(Target(node.name, node.input[0], node.input[1]))
    return out


def smooth_groups(model: onnx.ModelProto, targets: list[Target], through_cast: bool = False) -> list[SmoothGroup]:
    """LayerNorms whose output feeds only target MatMuls (directly, or with through_cast through one Cast, as
    in fp16 exports where LayerNorm runs in fp32); the group's activation is the MatMuls' input."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    users = _consumers(graph)
    by_activation = defaultdict(list)
    for t in targets:
        by_activation[t.activation].append(t)
    outputs = {o.name for o in graph.output}
    groups = []
    for node in graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 3 or node.output[0] in outputs:
            continue
        act, scale, bias = node.output[0], node.input[1], node.input[2]
        if through_cast and len(users[act]) == 1 and users[act][0].op_type == "Cast":
            act = users[act][0].output[0]
        fed = by_activation.get(act, [])
        if not fed or len(users[act]) != len(fed) or scale not in inits or bias not in inits:
            continue
        if len(users[scale]) != 1 or len(users[bias]) != 1:
            continue
        groups.append(SmoothGroup(act, scale, bias, tuple(t.weight for t in fed)))
    return groups


def lm_head(model: onnx.ModelProto, targets: list[Target], output: str) -> Target | None:
    """The target MatMul that makes graph output `output` (walking back through single-path nodes)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    by_node = {t.node: t for t in targets}
    name = output
    for _ in range(16):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return by_node.get(node.name)
        name = node.input[0]
    return None


def replace_graph(model: onnx.ModelProto, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto],
                  min_opset: int | None = None) -> None:
    """Put `nodes` and `initializers` in place of the graph's, and raise the default-domain opset to `min_opset`
    where it is lower (the Q/DQ forms need 13 for per-axis scales, 21 for INT4 blocks)."""
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    opset = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if min_opset is not None and opset is not None and opset.version < min_opset:
        opset.version = min_opset
