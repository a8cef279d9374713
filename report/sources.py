"""What `neoxrt compare` compares: a candidate graph (ours, Optimum's, or a bare .onnx with optimum's names)
and a reference (the PyTorch checkpoint, or another artifact with `--against`).

    open_candidate(path, reference_config, tokenizer_dir, allow_modified) -> Candidate
        our artifact folder     -> its manifest (files checked; with allow_modified the changed ones are listed)
        a folder with model.onnx, or a .onnx file -> the contract read from the graph, checked against the
                                   reference's config (layers, heads, head size, vocabulary)
    hidden_state_names(graph, layers) -> ({layer: value name}, method)   per-layer outputs by exporter naming
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import ArtifactError
from neoxrt.manifest import MANIFEST_FILE, changed_files, precision_of, read_manifest

INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "DequantizeLinear",
            "MatMulNBits"}
_ELEM = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool"}


@dataclass
class Candidate:
    generator: object  # neoxrt.runtime.Generator
    manifest: dict  # ours, or one made from the graph (stage "foreign")
    kind: str  # "neoxrt artifact", "onnx folder", "onnx file"
    model_path: Path
    precision: str
    modified: list[dict] = field(default_factory=list)


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def graph_contract(model) -> dict:
    """The I/O section of a manifest, read from a graph's inputs and outputs."""
    def spec(values):
        return [{"name": v.name, "dtype": _ELEM.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                 "shape": _dims(v)} for v in values]

    return {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


def check_contract(contract: dict, config: dict, where: str) -> None:
    """The graph's layers, heads, head size and vocabulary against the reference's config.

    Raises:
        ArtifactError: naming both sides.
    """
    inputs = {t["name"]: t for t in contract["inputs"]}
    outputs = {t["name"]: t for t in contract["outputs"]}
    missing = [n for n in (io.INPUT_IDS, io.ATTENTION_MASK, io.past_key(0)) if n not in inputs] + \
              [n for n in (io.LOGITS,) if n not in outputs]
    if missing:
        raise ArtifactError(f"{where}: expected a GPT-NeoX decoder with optimum's tensor names, missing "
                            f"{', '.join(missing)}")
    layers = sum(1 for n in inputs if re.fullmatch(r"past_key_values\.\d+\.key", n))
    _, heads, _, head_dim = inputs[io.past_key(0)]["shape"]
    vocab = outputs[io.LOGITS]["shape"][-1]
    want = (config["num_layers"], config["num_heads"], config["hidden_size"] // config["num_heads"], config["vocab_size"])
    got = (layers, heads, head_dim, vocab if isinstance(vocab, int) else want[3])
    if got != want:
        raise ArtifactError(f"{where} has {got[0]} layers, {got[1]} heads of size {got[2]}, vocabulary {got[3]}; "
                            f"the reference has {want[0]}, {want[1]} of size {want[2]}, {want[3]}")


def open_candidate(path: Path, config: dict, tokenizer_dir: Path | None, allow_modified: bool) -> Candidate:
    """Load what `neoxrt compare` is asked to check (see the module docstring).

    Raises:
        ArtifactError: no graph there, a contract that does not fit the reference, or (without allow_modified)
            our artifact's files differing from its manifest.
    """
    import onnx

    from neoxrt.runtime import Generator
    from neoxrt.runtime.generator import _check_io, _ort_session_for

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist (expected a neoxrt artifact folder, a folder with {io.MODEL_FILE} "
                            "or a .onnx file)")
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        manifest = read_manifest(path, ("export", "calibrate", "build"), verify_files=not allow_modified)
        modified = changed_files(path, manifest) if allow_modified else []
        generator = Generator.from_artifacts(path, verify=False)
        return Candidate(generator, manifest, "neoxrt artifact", path / io.MODEL_FILE, precision_of(manifest), modified)
    model_path = path / io.MODEL_FILE if path.is_dir() else path
    if not model_path.is_file() or model_path.suffix != ".onnx":
        raise ArtifactError(f"{path}: expected a neoxrt artifact folder, a folder with {io.MODEL_FILE} (e.g. Optimum's "
                            "export) or a .onnx file; found none")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not a model
        raise ArtifactError(f"{model_path}: not a readable ONNX model ({type(exc).__name__})") from None
    contract = graph_contract(model)
    check_contract(contract, config, str(model_path))
    ops = {n.op_type for n in model.graph.node}
    kv = next(t["dtype"] for t in contract["inputs"] if t["name"] == io.past_key(0))
    precision = "int8" if ops & INT8_OPS else "fp16" if kv == "float16" else "fp32"
    manifest = {"stage": "foreign", "config": dict(config), "io": contract, "files": {},
                "export_options": {"dtype": "fp16" if kv == "float16" else "fp32"}}
    del model
    session = _ort_session_for(model_path.parent, manifest, None, None, model_file=model_path.name)
    _check_io(session, manifest, model_path)
    tokenizer = None
    for folder in (model_path.parent, tokenizer_dir):
        if folder is not None and (Path(folder) / io.TOKENIZER_FILE).is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(Path(folder) / io.TOKENIZER_FILE))
            break
    kind = "onnx folder" if path.is_dir() else "onnx file"
    return Candidate(Generator(session, manifest, tokenizer), manifest, kind, model_path, precision)


def hidden_state_names(model, layers: int) -> tuple[dict[int, str], str | None]:
    """Each layer's output value, found by the naming of the exporters people use: ours (`hidden_states.{i}`),
    Optimum's TorchScript tracer (the last Add under `/gpt_neox/layers.{i}/`), the dynamo exporter (the last
    Add whose name carries `layers.{i}` / `layers_{i}_`). Returns ({} , None) when no naming matches all."""
    produced = [(n.op_type, n.name, o) for n in model.graph.node for o in n.output]
    ours = {i: f"hidden_states.{i}" for i in range(layers)}
    if all(any(o == name for _, _, o in produced) for name in ours.values()):
        return ours, "neoxrt's named hidden states"
    for method, pattern in (("Optimum/TorchScript node names", r"/gpt_neox/layers\.{i}/Add(_\d+)?$"),
                            ("dynamo node names", r"layers[._]{i}(?:[._/]|$).*add")):
        found = {}
        for i in range(layers):
            regex = re.compile(pattern.format(i=i), re.IGNORECASE)
            adds = [o for op, name, o in produced if op == "Add" and regex.search(name)]
            if adds:
                found[i] = adds[-1]
        if len(found) == layers:
            return found, method
    return {}, None


def first_layer_with_other_weights(model_path: Path, reference) -> int | None:
    """Fallback localisation: the first layer one of whose reference weights (as stored, or transposed, in the
    graph's dtype; each given as a list of equivalent forms) is found nowhere among the graph's initializers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    stored = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype in (np.float32, np.float16) and a.size > 1:
            stored.setdefault((a.dtype.str, a.shape), []).append(a)

    def present(w: np.ndarray) -> bool:
        for dtype in (np.float32, np.float16):
            for cand in (w, w.T):
                c = np.ascontiguousarray(cand).astype(dtype)
                if any(np.array_equal(c, s) for s in stored.get((c.dtype.str, c.shape), [])):
                    return True
        return False

    for i, layer in enumerate(reference.layer_weights()):
        if not all(any(present(form) for form in forms) for forms in layer):
            return i
    return None
