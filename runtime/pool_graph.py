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
    seqlens_k = write_indices + S - 1 (int32)   total = max(write_indices) + S (int32)
    (from ONNX Runtime 1.32: query_seqlens = `pool.query_lengths`, S for every row but an attached one, below)

Its contract with the pool, narrower than the export's (the pool keeps to it: `KVPool`):
- a row's mask is its first `write_indices + real` slots (the mask input is then unused);
- before ONNX Runtime 1.32, a run of more than one token where any row has a past takes one row (the kernel's
  rule: `KVPool.chunk_pasts`); from 1.32 the form passes `query_seqlens` (each row's S tokens, right padding
  included as above, from the pool's `pool.query_lengths`), with which the kernel takes such runs over several
  rows;
- a row fed a masked token (a decode run's row still in its prompt) writes at its own end, as TensorScatter does.

**The shared prefix** (the form with `query_seqlens`): a prefix many rows start with (a system prompt, a chat's
history) is held once, in its own buffers (`pool.shared.{i}.key/value` [1, H, P, D]), and the rows that start
with it (`pool.attached` 1) hold only the tokens after it: a decode step reads it once for all of them instead of
once a row. The kernel takes no second source of keys, so per layer the prefix's attention for a row's query is
folded into the kernel's own softmax as one more token (exact, up to float rounding):

    O, L = softmax(q K_p^T * scale) V_p, logsumexp(q K_p^T * scale)     (MatMuls over [H, B, P]: P read once)
    the prefix's token:  query q, key q * L / (scale * q.q) (its score is L), value O
    every row's q, k, v [B, S + E, H*D] (E = `pool.extra`: 1 where a row of the run is attached, else 0)
    query_seqlens = S + 1 for attached rows (the token counted, written at the slot the next step overwrites),
                    S for the others (the token is padding: neither written nor attended)
    y [B, S, H*D] = an attached row's second query's output, the others' first S (Where)

Softmax over a row's slots and that token equals softmax over prefix and slots, since exp(L) O sums the prefix's
exp(score) v. A row is attached only past its prompt (decode runs, S = 1); with E = 0 the run is the form above
(the prefix's nodes and the output's choice are in `If` nodes on E: not run).

Made at load time from model.onnx (the graph only is rewritten: the weights stay where they are, in the graph
or in model.onnx.data beside it), when the `onnx` package is importable and the graph is the fused static-cache
form in fp32; otherwise None and the pool runs model.onnx as exported.
"""

from __future__ import annotations

import functools
from pathlib import Path

from neoxrt import contract as io

GQA_DOMAIN = "com.microsoft"
# the shared-prefix inputs (the form with query_seqlens): per row its valid tokens (int64 [B]); per row whether it
# attends the shared prefix (int64 [B], 1 or 0); per layer the shared prefix's keys and values [1, H, P, D]
QUERY_LENGTHS, ATTACHED, EXTRA = "pool.query_lengths", "pool.attached", "pool.extra"  # EXTRA: int64 [1], 1 or 0


def shared_key(layer: int) -> str:
    return f"pool.shared.{layer}.key"


def shared_value(layer: int) -> str:
    return f"pool.shared.{layer}.value"


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

    batched = takes_query_seqlens()
    new += [helper.make_node("Shape", [io.INPUT_IDS], ["/pool/shape"]),
            helper.make_node("Slice", ["/pool/shape", const("/pool/one", [1]), const("/pool/two", [2])], ["/pool/S"]),
            helper.make_node("Add", [io.WRITE_INDICES, "/pool/S"], ["/pool/end_s" if batched else "/pool/end"])]
    if batched:
        # the per-row lengths: write_indices + each row's count (QUERY_LENGTHS: S, or S + 1 for an attached row) - 1,
        # and the run's longest, max(write_indices) + S + EXTRA (the shared prefix's token)
        new += [helper.make_node("Add", [io.WRITE_INDICES, QUERY_LENGTHS], ["/pool/end_q"]),
                helper.make_node("Sub", ["/pool/end_q", "/pool/one"], ["/pool/seqlens64"]),
                helper.make_node("Add", ["/pool/end_s", EXTRA], ["/pool/end"]),
                helper.make_node("Cast", [QUERY_LENGTHS], ["/pool/query_seqlens"], to=TensorProto.INT32),
                helper.make_node("Cast", [ATTACHED], ["/pool/attached_b"], to=TensorProto.BOOL),
                helper.make_node("Cast", [EXTRA], ["/pool/has_extra"], to=TensorProto.BOOL),
                helper.make_node("Reshape", ["/pool/attached_b", const("/pool/b11", [-1, 1, 1])],
                                 ["/pool/attached"])]
        # the shared prefix's constants
        graph.initializer.append(helper.make_tensor("/pool/minus_one_s", TensorProto.INT64, [], [-1]))
        const("/pool/minus_one", [-1])
        const("/pool/zero_axis", [0])
        const("/pool/max_int", [2**62])
        const("/pool/b1x", [0, 1, -1])
        s_value = scale if scale is not None else layers[0][4] ** -0.5
        graph.initializer.append(helper.make_tensor("/pool/scale", TensorProto.FLOAT, [], [s_value]))
        graph.initializer.append(helper.make_tensor("/pool/tiny", TensorProto.FLOAT, [], [1e-30]))
    else:  # the per-row lengths: write_indices + S - 1, and the run's longest, max(write_indices) + S
        new.append(helper.make_node("Sub", ["/pool/end", "/pool/one"], ["/pool/seqlens64"]))
    new += [helper.make_node("Cast", ["/pool/seqlens64"], ["/pool/seqlens_k"], to=TensorProto.INT32),
            helper.make_node("ReduceMax", ["/pool/end"], ["/pool/total64"], keepdims=0),
            helper.make_node("Cast", ["/pool/total64"], ["/pool/total"], to=TensorProto.INT32)]
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
        if batched:
            layer += _shared_prefix(helper, p, i, attn.input[0], flat)
            flat = [f"{p}/q_in", f"{p}/k_in", f"{p}/v_in"]
        layer.append(helper.make_node(
            "GroupQueryAttention", [*flat, k_scatter.input[0], v_scatter.input[0], *lengths],
            [f"{p}/y", k_scatter.output[0], v_scatter.output[0]], name=f"{p}/GroupQueryAttention", domain=GQA_DOMAIN,
            **attrs))
        if batched:
            layer += _shared_output(helper, p)
        layer.append(helper.make_node("Reshape", [f"{p}/y_out" if batched else f"{p}/y", "/pool/bshd"],
                                      [f"{p}/y_bshd"]))
        layer.append(helper.make_node("Transpose", [f"{p}/y_bshd"], [attn.output[0]], perm=[0, 2, 1, 3]))
        replaced[attn.output[0]], replaced[k_scatter.output[0]], replaced[v_scatter.output[0]] = layer, [], []
    ordered = list(new)  # the shared lengths read graph inputs only: first
    for node in graph.node:
        ordered += replaced.get(node.output[0], [node])
    del graph.node[:]
    graph.node.extend(_live(ordered, {o.name for o in graph.output}))
    if batched:
        graph.input.extend([helper.make_tensor_value_info(QUERY_LENGTHS, TensorProto.INT64, ["batch"]),
                            helper.make_tensor_value_info(ATTACHED, TensorProto.INT64, ["batch"]),
                            helper.make_tensor_value_info(EXTRA, TensorProto.INT64, [1])])
        for i, (*_, heads, head_dim) in enumerate(layers):
            graph.input.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                             [1, heads, "shared_sequence", head_dim])
                               for name in (shared_key(i), shared_value(i)))
    model.opset_import.append(helper.make_opsetid(GQA_DOMAIN, 1))
    return model.SerializeToString()


def _shared_prefix(helper, p: str, i: int, q4: str, flat: list[str]) -> list:
    """Layer `i`'s nodes that let an attached row attend the shared prefix (keys and values held once, not in its
    slots) inside the kernel's own softmax, exactly: the prefix's attention for the row's last query is one more
    token -- its value the prefix's softmax-weighted values O, its key a multiple of the query whose score is the
    prefix's log-sum-exp L (q . k = L / scale) -- so softmax over the row's slots and that token is softmax over
    prefix and slots. Every row's q, k, v get that token after its S (`{p}/q_in` ... [B, S + 1, H*D]); a row not
    attached leaves it out (its query_seqlens S: padding, neither written nor attended), an attached row (S = 1)
    counts it and takes the output of its second query (its real query again), which `_shared_output` picks."""
    n = helper.make_node
    q_flat, k_flat, v_flat = flat
    c = f"/pool/shared/{i}"
    compute = [
        # the last query of each row, [H, B, D]
        n("Gather", [q4, "/pool/minus_one_s"], [f"{c}/q_last"], axis=2),  # [B, H, D]
        n("Transpose", [f"{c}/q_last"], [f"{c}/q_hbd"], perm=[1, 0, 2]),
        # scores over the prefix [H, B, P], its softmax, O [H, B, D] and L [H, B, 1]
        n("Squeeze", [shared_key(i), "/pool/zero_axis"], [f"{c}/k"]),
        n("Squeeze", [shared_value(i), "/pool/zero_axis"], [f"{c}/v"]),
        n("Transpose", [f"{c}/k"], [f"{c}/k_t"], perm=[0, 2, 1]),
        n("MatMul", [f"{c}/q_hbd", f"{c}/k_t"], [f"{c}/qk"]),
        n("Mul", [f"{c}/qk", "/pool/scale"], [f"{c}/scores"]),
        n("ReduceMax", [f"{c}/scores", "/pool/minus_one"], [f"{c}/max"], keepdims=1),
        n("Sub", [f"{c}/scores", f"{c}/max"], [f"{c}/shifted"]),
        n("Exp", [f"{c}/shifted"], [f"{c}/e"]),
        n("ReduceSum", [f"{c}/e", "/pool/minus_one"], [f"{c}/sum"], keepdims=1),
        n("MatMul", [f"{c}/e", f"{c}/v"], [f"{c}/ev"]),
        n("Div", [f"{c}/ev", f"{c}/sum"], [f"{c}/o"]),
        n("Log", [f"{c}/sum"], [f"{c}/log_sum"]),
        n("Add", [f"{c}/max", f"{c}/log_sum"], [f"{c}/lse"]),
        # the prefix's token: query the row's last, key q * L / (scale * q.q), value O; [B, 1, H*D]
        n("Mul", [f"{c}/q_hbd", f"{c}/q_hbd"], [f"{c}/q2"]),
        n("ReduceSum", [f"{c}/q2", "/pool/minus_one"], [f"{c}/qq"], keepdims=1),
        n("Max", [f"{c}/qq", "/pool/tiny"], [f"{c}/qq_safe"]),
        n("Mul", [f"{c}/qq_safe", "/pool/scale"], [f"{c}/qq_scaled"]),
        n("Div", [f"{c}/lse", f"{c}/qq_scaled"], [f"{c}/factor"]),
        n("Mul", [f"{c}/q_hbd", f"{c}/factor"], [f"{c}/k_virt_hbd"]),
        n("Transpose", [f"{c}/k_virt_hbd"], [f"{c}/k_virt_bhd"], perm=[1, 0, 2]),
        n("Reshape", [f"{c}/k_virt_bhd", "/pool/b1x"], [f"{c}/k_virt"]),
        n("Transpose", [f"{c}/o"], [f"{c}/o_bhd"], perm=[1, 0, 2]),
        n("Reshape", [f"{c}/o_bhd", "/pool/b1x"], [f"{c}/v_virt"]),
        n("Reshape", [f"{c}/q_last", "/pool/b1x"], [f"{c}/q_virt"]),
    ]
    # the token only where a row of the run is attached (EXTRA 1: a padded query costs the kernel what a real one
    # does), its nodes in an If: a run without an attached row does not run them
    empty = [n("Slice", [x, "/pool/zero_axis", "/pool/zero_axis", "/pool/one"], [f"{c}/{x[-1]}_empty"])
             for x in flat]
    then = _branch(helper, f"{c}/with", compute, [f"{c}/{x}_virt" for x in "qkv"])
    other = _branch(helper, f"{c}/without", empty, [f"{c}/{x}_empty" for x in "qkv"])
    return [
        n("If", ["/pool/has_extra"], [f"{c}/{x}_extra" for x in "qkv"], then_branch=then, else_branch=other),
        n("Concat", [q_flat, f"{c}/q_extra"], [f"{p}/q_in"], axis=1),
        n("Concat", [k_flat, f"{c}/k_extra"], [f"{p}/k_in"], axis=1),
        n("Concat", [v_flat, f"{c}/v_extra"], [f"{p}/v_in"], axis=1),
    ]


def _shared_output(helper, p: str) -> list:
    """The attention output [B, S, H*D] from the kernel's [B, S + 1, H*D]: an attached row's second query, the
    others' first S."""
    n = helper.make_node
    then = _branch(helper, f"{p}/shared_with", [
        n("Slice", [f"{p}/y", EXTRA, "/pool/max_int", "/pool/one"], [f"{p}/y_after"]),
        n("Slice", [f"{p}/y", "/pool/zero_axis", "/pool/S", "/pool/one"], [f"{p}/y_before"]),
        n("Where", ["/pool/attached", f"{p}/y_after", f"{p}/y_before"], [f"{p}/y_mixed"])], [f"{p}/y_mixed"])
    other = _branch(helper, f"{p}/shared_without", [n("Identity", [f"{p}/y"], [f"{p}/y_same"])], [f"{p}/y_same"])
    return [n("If", ["/pool/has_extra"], [f"{p}/y_out"], then_branch=then, else_branch=other)]


def _branch(helper, name: str, nodes: list, outputs: list[str]):
    """An If branch: `nodes` reading the outer graph's values, `outputs` (float tensors) out."""
    from onnx import TensorProto

    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                               for o in outputs])


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` less those whose outputs nothing reads (the export's mask, which the pool form does not use)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(_reads(node))
    return keep[::-1]


def _reads(node) -> list[str]:
    """A node's inputs, and those of the nodes of its subgraphs (an If's branches read the outer graph)."""
    names = list(node.input)
    for attr in node.attribute:
        if attr.g.node:
            names += [x for sub in attr.g.node for x in _reads(sub)]
    return names
