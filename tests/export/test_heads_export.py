"""Head exports (`neoxrt export --task`): optimum's I/O, every row of left- and right-padded batches on ONNX
Runtime equal to transformers on that row alone (fp32 <= 1e-4, fp16 within the documented 0.05), on every
head and, for the sequence classifier, on every variant of the support table; the manifest records the task
and labels; tasks without weights and flags that do not apply are refused in one line."""

import json

import numpy as np
import onnx
import pytest

from neox_testing import (
    HEAD_ARCHITECTURES,
    HEAD_ROWS,
    LABELS,
    VARIANTS,
    head_errors,
    head_reference,
    ort_session,
    padded,
    write_head,
    write_variant,
)
from neoxrt import contract as io
from neoxrt.errors import CheckpointError, ExportError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.neox_onnx import onnx_from_model
from neoxrt.export.options import ExportOptions
from neoxrt.model.heads import load_head_model

ATOL = 1e-4
FP16_ATOL = 0.05  # documented fp16 tolerance against fp32 (docs/export.md)
OUTPUTS = {"text-classification": {io.LOGITS: [io.BATCH, 3]},
           "token-classification": {io.LOGITS: [io.BATCH, io.SEQUENCE, 3]},
           "question-answering": {io.START_LOGITS: [io.BATCH, io.SEQUENCE], io.END_LOGITS: [io.BATCH, io.SEQUENCE]},
           "feature-extraction": {io.LAST_HIDDEN_STATE: [io.BATCH, io.SEQUENCE, 64]}}


def _run(session, ids, mask) -> dict:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask})))


def _check(session, reference, atol):
    for side in ("left", "right"):
        ids, mask = padded(HEAD_ROWS, side)
        errors = head_errors(_run(session, ids, mask), reference, mask)
        assert errors and max(errors.values()) <= atol, (side, errors)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("attention", ["decomposed", "fused"])
@pytest.mark.parametrize("task", list(HEAD_ARCHITECTURES))
def test_head_artifact_matches_transformers(task, attention, dtype, tmp_path):
    reference = head_reference(write_head(task, tmp_path / "ckpt"), HEAD_ROWS)
    manifest = export_checkpoint(tmp_path / "ckpt", tmp_path / "art", ExportOptions(attention=attention, dtype=dtype),
                                 log=lambda *_: None)
    assert manifest["task"] == task and manifest["export_options"]["task"] == task
    if task in ("text-classification", "token-classification"):
        assert manifest["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert [t["name"] for t in manifest["io"]["inputs"]] == [io.INPUT_IDS, io.ATTENTION_MASK]
    assert {t["name"]: t["shape"] for t in manifest["io"]["outputs"]} == OUTPUTS[task]
    assert all(t["dtype"] == "float32" for t in manifest["io"]["outputs"])
    _check(ort_session(tmp_path / "art" / io.MODEL_FILE), reference, ATOL if dtype == "fp32" else FP16_ATOL)


@pytest.mark.parametrize("attention", ["decomposed", "fused"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sequence_classifier_variant_matches_transformers(name, attention, tmp_path):
    reference = head_reference(write_head("text-classification", tmp_path / "ckpt", VARIANTS[name], seed=2), HEAD_ROWS)
    proto = onnx_from_model(load_head_model(tmp_path / "ckpt"), ExportOptions(attention=attention))
    _check(ort_session(proto), reference, ATOL)


@pytest.mark.parametrize("attention", ["decomposed", "fused"])
def test_sequence_classifier_last_layer_runs_on_the_pooled_token(attention, tmp_path):
    """The last layer's keys and values cover every position, its output projection and MLP only the last real
    token (~6 % of a Pythia-160m classifier's arithmetic saved): hidden_states of that layer are [B, Hd], earlier
    layers' [B, S, Hd], and the logits still match every row."""
    reference = head_reference(write_head("text-classification", tmp_path / "ckpt"), HEAD_ROWS)
    proto = onnx_from_model(load_head_model(tmp_path / "ckpt"), ExportOptions(attention=attention))
    layers = sum(1 for n in proto.graph.node for o in n.output if o.startswith("hidden_states."))
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(f"hidden_states.{i}") for i in range(layers))
    session = ort_session(proto)
    for side in ("left", "right"):
        ids, mask = padded(HEAD_ROWS, side)
        out = _run(session, ids, mask)
        assert [out[f"hidden_states.{i}"].ndim for i in range(layers)] == [3] * (layers - 1) + [2]
        errors = head_errors({io.LOGITS: out[io.LOGITS]}, reference, mask)
        assert errors and max(errors.values()) <= ATOL, (side, errors)


def test_feature_extraction_from_a_causal_lm_checkpoint(tmp_path):
    """--task overrides architectures: the LM checkpoint's trunk, its embed_out left alone."""
    write_variant("gelu_parallel", tmp_path / "ckpt")
    manifest = export_checkpoint(tmp_path / "ckpt", tmp_path / "art", ExportOptions(task="feature-extraction"),
                                 log=lambda *_: None)
    assert manifest["task"] == "feature-extraction"
    graph = onnx.load(str(tmp_path / "art" / io.MODEL_FILE), load_external_data=False).graph
    assert "embed_out.weight" not in {t.name for t in graph.initializer}
    ids, mask = padded(HEAD_ROWS, "left")
    hidden = _run(ort_session(tmp_path / "art" / io.MODEL_FILE), ids, mask)[io.LAST_HIDDEN_STATE]
    assert hidden.shape == (len(HEAD_ROWS), ids.shape[1], VARIANTS["gelu_parallel"].hidden_size)
    assert np.isfinite(hidden).all()


def test_task_without_weights_is_refused(tmp_path):
    write_head("question-answering", tmp_path / "qa")
    with pytest.raises(CheckpointError, match="no weights for task text-classification .*it has question-answering"):
        export_checkpoint(tmp_path / "qa", tmp_path / "art", ExportOptions(task="text-classification"), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="no weights for task text-generation"):
        export_checkpoint(tmp_path / "qa", tmp_path / "art", ExportOptions(task="text-generation"), log=lambda *_: None)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("flags", [dict(attention="plugin"), dict(kv_cache="static", opset=24), dict(logits="last")])
def test_head_refuses_decoder_only_flags(flags):
    with pytest.raises(ExportError, match="applies to text-generation only"):
        ExportOptions(task="text-classification", **flags)
    with pytest.raises(ExportError, match="--task must be one of"):
        ExportOptions(task="translation")


def test_cli_export_task(tmp_path, capsys):
    from neoxrt.cli import main

    write_head("token-classification", tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "art"), "--task", "feature-extraction"]) == 0
    assert json.loads((tmp_path / "art" / io.MANIFEST_FILE).read_text())["task"] == "feature-extraction"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "art2"), "--task", "question-answering"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no weights for task question-answering" in err


@pytest.mark.parametrize("attention", ["decomposed", "fused"])
@pytest.mark.parametrize("task", list(HEAD_ARCHITECTURES))
def test_head_graphs_pass_the_tensorrt_support_check(task, attention, tmp_path):
    """Every op is one TensorRT's ONNX parser imports, in a type it takes (CumSum: float only)."""
    from neoxrt.export.tensorrt_graph import check_tensorrt_support, support_table, tensorrt_ready

    write_head(task, tmp_path / "ckpt")
    proto = tensorrt_ready(onnx_from_model(load_head_model(tmp_path / "ckpt"), ExportOptions(attention=attention,
                                                                                             dtype="fp16")))
    assert check_tensorrt_support(proto) == []
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    for node in proto.graph.node:
        if node.op_type == "CumSum":
            name = onnx.helper.tensor_dtype_to_string(types[node.input[0]]).removeprefix("TensorProto.")
            assert {"FLOAT": "FP32", "FLOAT16": "FP16"}.get(name) in support_table()["operators"]["CumSum"]["types"]
