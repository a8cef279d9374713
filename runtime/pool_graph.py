"""The KV-cache pool's own form of a static-cache graph on ONNX Runtime: attention through the
`com.microsoft.GroupQueryAttention` kernel instead of ONNX `TensorScatter` + `Attention`.

The exported static-cache graph (model.onnx, the one TensorRT engines are built from) writes each row's new keys
and values at its `write_indices` slot and attends over every slot of the bound width, the mask hiding the slots
past a row's end. ONNX Runtime's `Attention` kernel computes those hidden slots anyway: a short row bound at a
long row's width, or the first chunk of a long prompt, pays for the whole width. The pool's runs are narrower
than the contract: row j's visible slots are always its first `write_indices[j] + s + 1` for query s (no left
padding, no holes). That is what `GroupQueryAttention` takes, with past and present bound to one buffer and
per-row lengths (`seqlens_k`): it writes the new keys and values at slot `seqlens_k + 1 - S` of each row and reads
only the slots each row has (an ONNX Runtime profile of one decode step, 16 rows at context 512 bound at 704 slots,
Pythia-160m shape: attention 52.6 ms with the export's kernel, 20.5 ms with this one; docs/serving.md).

    per layer:  q, k [B,H,S,D] (rotated), v [B,H,S,D]  --Transpose, Reshape-->  [B,S,H*D] each
                GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total)  ->  y [B,S,H*D],
                present_key, present_value (the past buffers, written in place)
                y --Reshape, Transpose--> [B,H,S,D] under the Attention output's name (merge_heads unchanged)
    seqlens_k = write_indices + S - 1 (int32)   total = max(write_indices) + S (int32)   query_seqlens = S (int32)

Its contract with the pool, narrower than the export's (the pool keeps to it: `KVPool`):
- a row's mask is its first `write_indices + real` slots (the mask input is then unused);
- before ONNX Runtime 1.32, a run of more than one token where any row has a past takes one row (the kernel's
  rule: `KVPool.chunk_pasts`); from 1.32 the form passes `query_seqlens` (every row's S tokens, right padding
  included as above), with which the kernel takes such runs over several rows;
- a row fed a masked token (a decode run's row still in its prompt) writes at its own end, as TensorScatter does.

Made at load time from model.onnx (the graph only is rewritten: the weights stay where they are, in the graph
or in model.onnx.data beside it), when the `onnx` package is importable and the graph is the fused static-cache
form in fp32; otherwise None and the pool runs model.onnx as exported.
"""

from __future__ import annotations

import functools
from pathlib import Path

from neoxrt import contract as io

GQA_DOMAIN = "com.microsoft"


def pool_form(path: Path) -> str:
    """"gqa" where the pool form applies to model.onnx, else "export" (the graph alone is read)."""
    try:
        import onnx
    except ImportError:
        return "export"
    return "gqa" if _layers(onnx.load(str(path), load_external_data=False)) else "export"


@functools.cache
def takes_query_seqlens() -> bool:
    """Whether ONNX Runtime's GroupQueryAttention takes `query_seqlens` (1.32 on): with it, a run of several tokens
    may take several rows with a past (its right-padded chunks contract); without, such a run takes one row."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    return any(s.name == "GroupQueryAttention" and s.domain == GQA_DOMAIN and "query_seqlens" in
               [i.name for i in s.inputs] for s in ort_c.get_all_operator_schema())


def _layers(model) -> list | None:
    """Per layer (Attention, its key TensorScatter, its value TensorScatter, heads, head size) where the pool
    form applies to `model` (an `onnx.ModelProto`), else None."""
    from onnx import TensorProto

    graph = model.graph
    inputs = {v.name: v for v in graph.input}
    if io.WRITE_INDICES not in inputs or any(op.domain == GQA_DOMAIN for op in model.opset_import):
        return None
    producer = {out: n for n in graph.node for out in n.output}
    layers = []
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) != 4:
            continue
        k_scatter, v_scatter = producer.get(node.input[1]), producer.get(node.input[2])
        if not (k_scatter and v_scatter and k_scatter.op_type == v_scatter.op_type == "TensorScatter"
                and k_scatter.input[2] == v_scatter.input[2] == io.WRITE_INDICES):
            return None
        past = inputs.get(k_scatter.input[0])
        if past is None or past.type.tensor_type.elem_type != TensorProto.FLOAT:
            return None  # fp16: ONNX Runtime's fp16 kernel on CPU was slower at decode (measured); keep the export's
        dims = [d.dim_value for d in past.type.tensor_type.shape.dim]
        if len(dims) != 4 or not dims[1] or not dims[3] or dims[3] % 8:  # the kernel's head size rule
            return None
        layers.append((node, k_scatter, v_scatter, dims[1], dims[3]))
    return layers or None


def gqa_graph(path: Path) -> bytes | None:
    """model.onnx's pool form (serialized), or None when it does not apply (see the module doc)."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    layers = _layers(model)
    if layers is None:
        return None
    scale = {a.name: a.f for a in layers[0][0].attribute}.get("scale")
    new: list = []

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    # the per-row lengths: write_indices + S - 1, and the run's longest, max(write_indices) + S
    new += [helper.make_node("Shape", [io.INPUT_IDS], ["/pool/shape"]),
            helper.make_node("Slice", ["/pool/shape", const("/pool/one", [1]), const("/pool/two", [2])], ["/pool/S"]),
            helper.make_node("Add", [io.WRITE_INDICES, "/pool/S"], ["/pool/end"]),
            helper.make_node("Sub", ["/pool/end", "/pool/one"], ["/pool/seqlens64"]),
            helper.make_node("Cast", ["/pool/seqlens64"], ["/pool/seqlens_k"], to=TensorProto.INT32),
            helper.make_node("ReduceMax", ["/pool/end"], ["/pool/total64"], keepdims=0),
            helper.make_node("Cast", ["/pool/total64"], ["/pool/total"], to=TensorProto.INT32)]
    batched = takes_query_seqlens()
    if batched:  # every row's S tokens count (right padding included, as above): chunks after a past may batch
        new += [helper.make_node("Slice", ["/pool/shape", const("/pool/zero", [0]), "/pool/one"], ["/pool/B"]),
                helper.make_node("Expand", ["/pool/S", "/pool/B"], ["/pool/query64"]),
                helper.make_node("Cast", ["/pool/query64"], ["/pool/query_seqlens"], to=TensorProto.INT32)]
    const("/pool/bshd", [0, 0, layers[0][3], layers[0][4]])
    const("/pool/bsx", [0, 0, -1])
    replaced = {}  # a node's first output -> what takes its place (each layer's new nodes where its Attention was)
    for i, (attn, k_scatter, v_scatter, heads, _) in enumerate(layers):
        p, layer, flat = f"/pool/layers.{i}", [], []
        for name, src in (("q", attn.input[0]), ("k", k_scatter.input[1]), ("v", v_scatter.input[1])):
            layer.append(helper.make_node("Transpose", [src], [f"{p}/{name}_bshd"], perm=[0, 2, 1, 3]))
            layer.append(helper.make_node("Reshape", [f"{p}/{name}_bshd", "/pool/bsx"], [f"{p}/{name}"]))
            flat.append(f"{p}/{name}")
        attrs = {"num_heads": heads, "kv_num_heads": heads, **({"scale": scale} if scale is not None else {})}
        lengths = ["/pool/seqlens_k", "/pool/total"] + ([""] * 9 + ["/pool/query_seqlens"] if batched else [])
        layer.append(helper.make_node(
            "GroupQueryAttention", [*flat, k_scatter.input[0], v_scatter.input[0], *lengths],
            [f"{p}/y", k_scatter.output[0], v_scatter.output[0]], name=f"{p}/GroupQueryAttention", domain=GQA_DOMAIN,
            **attrs))
        layer.append(helper.make_node("Reshape", [f"{p}/y", "/pool/bshd"], [f"{p}/y_bshd"]))
        layer.append(helper.make_node("Transpose", [f"{p}/y_bshd"], [attn.output[0]], perm=[0, 2, 1, 3]))
        replaced[attn.output[0]], replaced[k_scatter.output[0]], replaced[v_scatter.output[0]] = layer, [], []
    ordered = list(new)  # the shared lengths read graph inputs only: first
    for node in graph.node:
        ordered += replaced.get(node.output[0], [node])
    del graph.node[:]
    graph.node.extend(_live(ordered, {o.name for o in graph.output}))
    model.opset_import.append(helper.make_opsetid(GQA_DOMAIN, 1))
    return model.SerializeToString()


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` less those whose outputs nothing reads (the export's mask, which the pool form does not use)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]
