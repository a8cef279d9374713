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

Two variants. **Packed** (ONNX Runtime 1.32 on, whose kernel takes `query_seqlens`: right-padded chunks of
per-row counts, batched whatever the rows' pasts): a run takes each row's own tokens packed in one sequence, so
nothing outside attention computes padding, rows of any lengths share a run, and the LM head reads only the
tokens asked for:

    input_ids, position_ids [1, N] (row j's count_j tokens after row j-1's); write_indices [B] (each row's end)
    per layer:  q, k, v [1,H,N,D]  --Transpose, Reshape-->  [N,H*D]  --Gather(pool.gather)-->  [B,S,H*D]
                GroupQueryAttention(..., seqlens_k, total, query_seqlens)  ->  y [B,S,H*D], the cache in place
                y  --Reshape-->  [B*S,H*D]  --Gather(pool.scatter)-->  [N,H*D]  --Reshape, Transpose-->  [1,H,N,D]
    LM head:    hidden states [1,N,Hd]  --Gather(pool.logit_rows)-->  [1,M,Hd]  ->  logits [1,M,V]
    seqlens_k = write_indices + count - 1   total = max(write_indices + count)   query_seqlens = count  (S = max
    count; the kernel writes only a row's own count_j tokens, and needs write_indices_j + S slots in every row)

**Padded** (older kernels): rows right-padded to S, as the exported graph takes them:

    per layer:  q, k [B,H,S,D] (rotated), v [B,H,S,D]  --Transpose, Reshape-->  [B,S,H*D] each
                GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total)  ->  y [B,S,H*D],
                present_key, present_value (the past buffers, written in place)
                y --Reshape, Transpose--> [B,H,S,D] under the Attention output's name (merge_heads unchanged)
    seqlens_k = write_indices + S - 1 (int32)   total = max(write_indices) + S (int32)

Its contract with the pool, narrower than the export's (the pool keeps to it: `KVPool`):
- a row's mask is its first `write_indices + real` slots (the mask input is then unused);
- padded: a run of more than one token where any row has a past takes one row (the kernel's rule:
  `KVPool.chunk_pasts`); packed: no such rule;
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
# the packed form's inputs (int64): per row its token count; per padded [row, position] the packed token there (0
# for padding); per packed token its padded [row, position] (row * S + position); the packed tokens whose logits
# come back
QUERY_LENGTHS, GATHER, SCATTER, LOGIT_ROWS = "pool.query_lengths", "pool.gather", "pool.scatter", "pool.logit_rows"


def pool_form(path: Path) -> str:
    """"packed" or "gqa" (padded) where the pool form applies to model.onnx, else "export" (the graph alone is
    read)."""
    try:
        import onnx
    except ImportError:
        return "export"
    model = onnx.load(str(path), load_external_data=False)
    if not _layers(model):
        return "export"
    return "packed" if takes_query_seqlens() and _head_input(model) else "gqa"


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
    """model.onnx's pool form (serialized), or None when it does not apply (see the module doc): packed where the
    installed kernel takes `query_seqlens` and the graph's LM head is found, else right-padded rows."""
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
    head = _head_input(model) if takes_query_seqlens() else None
    scale = {a.name: a.f for a in layers[0][0].attribute}.get("scale")
    new: list = []

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        new.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    heads, head_dim = layers[0][3], layers[0][4]
    const("/pool/one", [1])
    if head is not None:
        # each row's tokens, packed: S = the longest row's count; rows with fewer are right-padded in attention only
        query = QUERY_LENGTHS
        node("Shape", [io.WRITE_INDICES], "/pool/B")
        node("Concat", ["/pool/B", const("/pool/minus_one", [-1]), const("/pool/hd", [heads * head_dim])],
             "/pool/b_s_hd", axis=0)
    else:
        node("Shape", [io.INPUT_IDS], "/pool/shape")
        query = node("Slice", ["/pool/shape", "/pool/one", const("/pool/two", [2])], "/pool/S")
    # the per-row lengths: write_indices + S - 1 (packed: + its own count - 1), the run's longest, the counts
    node("Add", [io.WRITE_INDICES, query], "/pool/end")
    node("Cast", [node("Sub", ["/pool/end", "/pool/one"], "/pool/seqlens64")], "/pool/seqlens_k", to=TensorProto.INT32)
    node("Cast", [node("ReduceMax", ["/pool/end"], "/pool/total64", keepdims=0)], "/pool/total", to=TensorProto.INT32)
    if head is not None:
        node("Cast", [QUERY_LENGTHS], "/pool/query_seqlens", to=TensorProto.INT32)
    const("/pool/bshd", [0, 0, heads, head_dim])
    const("/pool/bsx", [0, 0, -1])
    const("/pool/packed_hd", [-1, heads * head_dim])
    const("/pool/packed_bhsd", [1, -1, heads, head_dim])
    replaced = {}  # a node's first output -> what takes its place (each layer's new nodes where its Attention was)
    for i, (attn, k_scatter, v_scatter, heads, _) in enumerate(layers):
        p, layer, flat = f"/pool/layers.{i}", [], []
        for name, src in (("q", attn.input[0]), ("k", k_scatter.input[1]), ("v", v_scatter.input[1])):
            layer.append(helper.make_node("Transpose", [src], [f"{p}/{name}_bshd"], perm=[0, 2, 1, 3]))
            if head is not None:  # [1,N,H,D] -> [N,H*D] -> each row's tokens at its own [b, s] -> [B,S,H*D]
                layer.append(helper.make_node("Reshape", [f"{p}/{name}_bshd", "/pool/packed_hd"], [f"{p}/{name}_nx"]))
                layer.append(helper.make_node("Gather", [f"{p}/{name}_nx", GATHER], [f"{p}/{name}_rows"], axis=0))
                layer.append(helper.make_node("Reshape", [f"{p}/{name}_rows", "/pool/b_s_hd"], [f"{p}/{name}"]))
            else:
                layer.append(helper.make_node("Reshape", [f"{p}/{name}_bshd", "/pool/bsx"], [f"{p}/{name}"]))
            flat.append(f"{p}/{name}")
        attrs = {"num_heads": heads, "kv_num_heads": heads, **({"scale": scale} if scale is not None else {})}
        lengths = ["/pool/seqlens_k", "/pool/total"] + ([""] * 9 + ["/pool/query_seqlens"] if head else [])
        layer.append(helper.make_node(
            "GroupQueryAttention", [*flat, k_scatter.input[0], v_scatter.input[0], *lengths],
            [f"{p}/y", k_scatter.output[0], v_scatter.output[0]], name=f"{p}/GroupQueryAttention", domain=GQA_DOMAIN,
            **attrs))
        if head is not None:  # [B,S,H*D] -> [B*S,H*D] -> the packed tokens' rows -> [1,H,N,D]
            layer.append(helper.make_node("Reshape", [f"{p}/y", "/pool/packed_hd"], [f"{p}/y_rows"]))
            layer.append(helper.make_node("Gather", [f"{p}/y_rows", SCATTER], [f"{p}/y_nx"], axis=0))
            layer.append(helper.make_node("Reshape", [f"{p}/y_nx", "/pool/packed_bhsd"], [f"{p}/y_bshd"]))
        else:
            layer.append(helper.make_node("Reshape", [f"{p}/y", "/pool/bshd"], [f"{p}/y_bshd"]))
        layer.append(helper.make_node("Transpose", [f"{p}/y_bshd"], [attn.output[0]], perm=[0, 2, 1, 3]))
        replaced[attn.output[0]], replaced[k_scatter.output[0]], replaced[v_scatter.output[0]] = layer, [], []
    if head is not None:  # the LM head reads the packed tokens at LOGIT_ROWS only
        consumer, hidden = head
        if consumer.op_type == "Slice":  # logits_to_keep's, or the last position's: replaced
            replaced[consumer.output[0]] = [helper.make_node("Gather", [hidden, LOGIT_ROWS], [consumer.output[0]],
                                                             axis=1)]
        else:
            new.append(helper.make_node("Gather", [hidden, LOGIT_ROWS], ["/pool/head_rows"], axis=1))
            consumer.input[list(consumer.input).index(hidden)] = "/pool/head_rows"
        logits = next(o for o in graph.output if o.name == io.LOGITS).type.tensor_type.shape.dim
        logits[1].dim_param = "logit_rows"  # [1, logit rows, V], whatever the export's length there
        for name, shape in ((QUERY_LENGTHS, ["rows"]), (GATHER, ["padded_tokens"]), (SCATTER, ["tokens"]),
                            (LOGIT_ROWS, ["logit_rows"])):
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, shape))
    ordered = list(new)  # the shared lengths read graph inputs only: first
    for n in graph.node:
        ordered += replaced.get(n.output[0], [n])
    del graph.node[:]
    graph.node.extend(_live(ordered, {o.name for o in graph.output}))
    read = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if not t.name.startswith("/pool/") or t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    model.opset_import.append(helper.make_opsetid(GQA_DOMAIN, 1))
    return model.SerializeToString()


def _head_input(model):
    """(the node, its input): where the LM head first reads the last layer's hidden states -- the export's
    logits_to_keep or last-position Slice, or the final layer norm -- or None (another graph)."""
    graph = model.graph
    last = max((n.output[0] for n in graph.node if n.output and n.output[0].startswith("hidden_states.")),
               key=lambda name: int(name.rsplit(".", 1)[1]) if name.rsplit(".", 1)[1].isdigit() else -1, default=None)
    readers = [n for n in graph.node if last in n.input]
    if len(readers) != 1 or readers[0].op_type not in ("Slice", "LayerNormalization"):
        return None
    return readers[0], last


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` less those whose outputs nothing reads (the export's mask, which the pool form does not use)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]
