"""`neoxrt calibrate` on head artifacts (input_ids and attention_mask, no KV cache): SmoothQuant W8A8 and
weights-only INT8 of the classification heads; the artifact keeps task and id2label, runs in `Classifier`,
and its `neoxrt compare` report (output error, label agreement against the PyTorch head) passes the INT8
thresholds; INT4 of a head is refused in one line."""

import json

import numpy as np
import onnx
import pytest

from neox_testing import HEAD_TEXTS as TEXTS
from neox_testing import export_heads
from neoxrt import contract as io
from neoxrt.calibration.calibrate import SUMMARY_FILE, calibrate_artifact
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.cli import main
from neoxrt.errors import CalibrationError
from neoxrt.report.compare import CompareOptions, run_compare
from neoxrt.runtime import Classifier

QUIET = dict(log=lambda *_: None)
MODES = {"w8a8": CalibrationOptions(samples=8, seq_len=32), "weights-only": CalibrationOptions(weights_only=True)}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate-heads")
    return {task: (root / task, art) for task, (art, _) in export_heads(root, (io.TEXT_CLASSIFICATION,
                                                                               io.TOKEN_CLASSIFICATION)).items()}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("task", [io.TEXT_CLASSIFICATION, io.TOKEN_CLASSIFICATION])
def test_classification_heads_calibrate_to_int8_that_keeps_the_labels(heads, tmp_path, task, mode):
    checkpoint, fp32 = heads[task]
    manifest = calibrate_artifact(fp32, tmp_path / "int8", MODES[mode], progress=False, **QUIET)
    source = json.loads((fp32 / io.MANIFEST_FILE).read_text())
    assert manifest["task"] == task and manifest["id2label"] == source["id2label"]
    assert [t["name"] for t in manifest["io"]["inputs"]] == [io.INPUT_IDS, io.ATTENTION_MASK]
    quant = manifest["quantization"]
    assert quant["matmuls"] == 9  # 2 layers x (QKV, dense, MLP in, MLP out) + the head's output layer
    assert quant["activations"] == ("fp32" if mode == "weights-only" else "int8 symmetric per tensor")
    if mode == "w8a8":  # the LayerNorms in front of QKV, MLP and the head's output layer are smoothed
        assert quant["smoothquant_layernorms"] == 5 and (tmp_path / "int8" / SUMMARY_FILE).is_file()
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / io.MODEL_FILE), load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops or "MatMulNBits" in ops
    want, got = Classifier.from_artifacts(fp32), Classifier.from_artifacts(tmp_path / "int8")
    if task == io.TEXT_CLASSIFICATION:
        a, b = want.classify(TEXTS), got.classify(TEXTS)
        diff = max(np.abs(np.array(x.logits) - np.array(y.logits)).max() for x, y in zip(a, b))
        assert [x.label for x in a] == [y.label for y in b]
    else:
        a, b = want.tag(TEXTS), got.tag(TEXTS)
        labels = [(x.label == y.label) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
        assert np.mean(labels) >= 0.8  # 25 tokens of a tiny random head (near-ties); the report checks more
        diff = max(abs(x.score - y.score) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert 0 < diff < 0.5  # quantized (not the fp32 graph), and close to it
    report = run_compare(tmp_path / "int8", checkpoint, CompareOptions(progress=False))
    checks = {c["name"]: c for c in report["checks"]}
    assert report["passed"] and checks["label_agreement"]["value"] >= 0.95, report["checks"]


def test_int4_of_a_head_is_refused_in_one_line(heads, tmp_path, capsys):
    _, fp32 = heads[io.TEXT_CLASSIFICATION]
    with pytest.raises(CalibrationError, match="INT4 is for text-generation exports"):
        calibrate_artifact(fp32, tmp_path / "int4", CalibrationOptions(weights_only=True, bits=4), **QUIET)
    assert main(["calibrate", str(fp32), str(tmp_path / "int8"), "--samples", "4", "--seq-len", "16"]) == 0
    assert json.loads((tmp_path / "int8" / io.MANIFEST_FILE).read_text())["task"] == io.TEXT_CLASSIFICATION
    assert not (tmp_path / "int4").exists()
