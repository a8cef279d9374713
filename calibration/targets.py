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


def quant_targets(model: onnx.ModelProto) -> list[Target]:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    out = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if w.data_type != onnx.TensorProto.FLOAT or len(w.dims) != 2 or len(users[w.name]) != 1:
            continue  # fp16 weights, batched weights or weights shared with another op stay as they are
        out.append(Target(node.name, node.input[0], node.input[1]))
    return out


def smooth_groups(model: onnx.ModelProto, targets: list[Target]) -> list[SmoothGroup]:
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
        fed = by_activation.get(act, [])
        if not fed or len(users[act]) != len(fed) or scale not in inits or bias not in inits:
            continue
        if len(users[scale]) != 1 or len(users[bias]) != 1:
            continue
        groups.append(SmoothGroup(act, scale, bias, tuple(t.weight for t in fed)))
    return groups
