"""Activation statistics one transformer layer at a time: the graph cut at its named hidden states
(`hidden_states.{i}`, export/neox_onnx.py) into one ONNX Runtime session per layer, each fed the previous
layer's outputs for every calibration window.

    stage 0:  input_ids, mask, positions, past 0 --[embedding + layer 0]--> hidden_states.0, layer 0's activations
    stage i:  hidden_states.{i-1}, mask, positions, past i --[layer i]--> hidden_states.i, its activations
    last:     hidden_states.{L-1} --[final LayerNorm]--> the LM head's activation

`run` yields each stage's ActivationStats before the next stage starts, so the caller can use and drop them
(AWQ's K x K Gram matrices): memory holds one layer's session (its weights are the source's mapped file
pages), one stage's statistics, and the windows' hidden states (windows x tokens x hidden, in the graph's
type). A graph without our hidden-state names is one stage (the whole graph).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from neoxrt import contract as io
from neoxrt.calibration.awq import ActivationStats
from neoxrt.export.neox_onnx import hidden_state_name
from neoxrt.progress import Progress


@dataclass
class Stage:
    nodes: list[int]  # indices into graph.node, in graph order
    boundary_in: str | None  # the previous stage's hidden state (a graph input of this stage)
    boundary_out: str | None  # this stage's hidden state (fed to the next)
    activations: list[str]


def _closure(graph: onnx.GraphProto, producer: dict[str, int], outputs: list[str], stop: set[str]) -> set[int]:
    """Indices of the nodes needed to compute `outputs`, not looking past the names in `stop`."""
    seen, todo = set(), [o for o in outputs if o not in stop]
    while todo:
        index = producer.get(todo.pop())
        if index is None or index in seen:
            continue
        seen.add(index)
        todo += [name for name in graph.node[index].input if name and name not in stop]
    return seen


def stages(model: onnx.ModelProto, activations: list[str]) -> list[Stage]:
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    hidden = []
    while hidden_state_name(len(hidden)) in producer:
        hidden.append(hidden_state_name(len(hidden)))
    if not hidden:
        return [Stage(sorted(_closure(graph, producer, activations, set())), None, None, list(activations))]
    out, placed = [], set()
    for i, name in enumerate(hidden + [None]):
        before = hidden[i - 1] if i else None
        stop = {before} if before else set()
        wanted = [name] if name else [a for a in activations if a not in placed]
        nodes = _closure(graph, producer, wanted, stop)
        made = {o for n in nodes for o in graph.node[n].output}
        acts = [a for a in activations if a in made and a not in placed]
        placed.update(acts)
        if name or acts:
            out.append(Stage(sorted(nodes), before, name, acts))
    return out


def _stage_model(model: onnx.ModelProto, typed: dict[str, onnx.ValueInfoProto], stage: Stage) -> onnx.ModelProto:
    graph = model.graph
    nodes = [graph.node[i] for i in stage.nodes]
    made = {o for n in nodes for o in n.output}
    read = {name for n in nodes for name in n.input if name}
    inits = [t for t in graph.initializer if t.name in read]
    inputs = [v for v in graph.input if v.name in read]
    if stage.boundary_in is not None:
        inputs.append(typed[stage.boundary_in])
    wanted = ([stage.boundary_out] if stage.boundary_out else []) + stage.activations
    outputs = [typed[name] for name in wanted if name in made]
    sub = onnx.helper.make_graph(nodes, f"{graph.name}-stage", inputs, outputs, inits)
    out = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return out


def _types(model: onnx.ModelProto, names: set[str]) -> dict[str, onnx.ValueInfoProto]:
    """Element types of the named values (shape inference on the graph without its weights' bytes)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    out = {}
    for name in names:
        elem = known[name].type.tensor_type.elem_type if name in known else onnx.TensorProto.FLOAT
        out[name] = onnx.helper.make_tensor_value_info(name, elem, None)
    return out


class LayeredStats:
    """Per-stage statistics of `activations` over calibration windows (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, activations: list[str], weights_dir: Path, threads: int | None = None,
                 gram_for: set[str] = frozenset()):
        self.model, self.weights_dir, self.threads, self.gram_for = model, Path(weights_dir), threads, set(gram_for)
        self.stages = stages(model, list(activations))
        names = {s.boundary_out for s in self.stages if s.boundary_out} | set(activations)
        self.types = _types(model, names)
        past = next(i for i in model.graph.input if i.name == io.past_key(0))
        dims = past.type.tensor_type.shape.dim
        self.layers = sum(1 for i in model.graph.input if i.name.endswith(".key"))
        self.heads, self.head_dim = int(dims[1].dim_value), int(dims[3].dim_value)
        self.static = any(i.name == io.WRITE_INDICES for i in model.graph.input)
        self.kv_dtype = "float16" if past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float32"

    def _session(self, sub: onnx.ModelProto, tmp: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only (TensorScatter warns on every run of a static graph not in place)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")  # weights stay mapped file pages
        options.enable_cpu_mem_arena = False  # fp16 MatMuls widen their weight per call: freed after, not pooled
        if self.threads:
            options.intra_op_num_threads = self.threads
        path = tmp / io.MODEL_FILE
        onnx.save_model(sub, str(path))
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        finally:
            path.unlink()

    def run(self, windows: np.ndarray, batch: int, label: str = "calibrate: statistics by layer",
            progress: bool = True) -> Iterator[dict[str, ActivationStats]]:
        """Yield, stage after stage, {activation: ActivationStats} of that stage's activations."""
        starts = range(0, len(windows), batch)
        carried: list[np.ndarray | None] = [None] * len(starts)
        bar = Progress(len(self.stages), label, progress)
        # beside the source (same file system): its weights file is hard-linked in, not copied (ONNX Runtime
        # refuses external data that resolves outside the model's folder)
        with tempfile.TemporaryDirectory(prefix=".neoxrt-calib-", dir=self.weights_dir.resolve().parent) as tmp:
            tmp = Path(tmp)
            if (self.weights_dir / io.WEIGHTS_FILE).is_file():
                os.link((self.weights_dir / io.WEIGHTS_FILE).resolve(), tmp / io.WEIGHTS_FILE)
            for done, stage in enumerate(self.stages):
                sess = self._session(_stage_model(self.model, self.types, stage), tmp)
                wanted = [o.name for o in sess.get_outputs()]
                inputs = {i.name for i in sess.get_inputs()}
                stats = {a: ActivationStats(want_gram=a in self.gram_for) for a in stage.activations}
                for k, start in enumerate(starts):
                    ids = windows[start: start + batch]
                    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
                    feeds = io.prompt_feeds(ids, np.ones_like(ids), pos, self.layers, self.heads, self.head_dim,
                                            self.kv_dtype, self.static)
                    feeds = {name: value for name, value in feeds.items() if name in inputs}
                    if stage.boundary_in is not None:
                        feeds[stage.boundary_in] = carried[k]
                    values = dict(zip(wanted, sess.run(wanted, feeds)))
                    carried[k] = values.pop(stage.boundary_out, None) if stage.boundary_out else None
                    for name, x in values.items():
                        if name in stats:
                            stats[name].add(x)
                del sess
                bar.update(done + 1)
                yield stats
