"""A small helper over `onnx.helper` for emitting a graph node by node: unique node names under a scope,
initializers, and value names that read like the PyTorch module path.

Weights may be given lazily (anything with `shape`, `dtype` and `blocks()`, e.g. `neoxrt.model.weights.LazyArray`):
the graph then holds a data-less initializer of the right shape and type, and `export.external_data`
streams the bytes into the file when the model is saved."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NP_TO_ONNX = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
              np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32, np.dtype("bool"): TensorProto.BOOL}
NAME_TO_ONNX = {str(k): v for k, v in NP_TO_ONNX.items()}


def required_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph's inputs but those with a default (an initializer of the same name: logits_to_keep), as ONNX
    Runtime's `get_inputs` lists them."""
    defaults = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in defaults]


class GraphBuilder:
    """Collects nodes and initializers; `op` returns the output name(s) of the node it adds."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.scope = ""
        self.domains: dict[str, int] = {}
        self.lazy: dict[str, object] = {}  # initializer name -> lazy array, written when the model is saved

    def _unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def weight(self, name: str, array) -> str:
        """A named initializer (weights keep their checkpoint names); `array` is numpy or lazy."""
        if isinstance(array, np.ndarray):
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        else:  # shape and type now, bytes when saved
            self.initializers.append(TensorProto(name=name, data_type=NP_TO_ONNX[np.dtype(array.dtype)], dims=array.shape))
            self.lazy[name] = array
        self._names.add(name)
        return name

    def const(self, value, dtype: str = "int64") -> str:
        """A small constant initializer, shared between uses of the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self._unique(f"const_{len(self._consts)}"), array)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Add a node; `outputs` is a count (names generated) or explicit names."""
        base = f"{self.scope}/{op_type}"
        node_name = self._unique(base)
        if isinstance(outputs, int):
            outputs = [self._unique(f"{node_name}_output_{i}") for i in range(outputs)]
        else:
            self._names.update(outputs)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def make_model(self, name: str, inputs, outputs, opset: int, doc: str = "") -> onnx.ModelProto:
        """inputs/outputs: contract `TensorSpec`s."""

        def value_info(spec):
            return helper.make_tensor_value_info(spec.name, NAME_TO_ONNX[spec.dtype], list(spec.shape))

        graph = helper.make_graph(self.nodes, name, [value_info(s) for s in inputs], [value_info(s) for s in outputs],
                                  self.initializers)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="neoxrt", doc_string=doc)
        model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        return model
