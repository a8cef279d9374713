"""`neoxrt compare` on head artifacts: output error and label agreement against the PyTorch head (each row
alone, the artifact on padded batches), per-layer localisation, report files; every head and fp16."""

import json

import pytest

from neox_testing import HEAD_ARCHITECTURES, TEXT_CONFIG, write_head
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.report.compare import CompareOptions, run_compare

OPTIONS = CompareOptions(seq_len=48, windows=5, batch=2, progress=False)


@pytest.mark.parametrize("task", list(HEAD_ARCHITECTURES))
def test_head_artifact_passes_against_its_checkpoint(task, tmp_path):
    write_head(task, tmp_path / "ckpt", TEXT_CONFIG, seed=4, tokenizer=True)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "art", ExportOptions(), log=lambda *_: None)
    report = run_compare(tmp_path / "art", tmp_path / "ckpt", OPTIONS)
    assert report["task"] == task and report["passed"], report["checks"]
    names = {c["name"] for c in report["checks"]}
    assert names == ({"output_max_abs"} if task == "feature-extraction" else {"output_max_abs", "label_agreement"})
    assert report["rows"] == 5 and report["tokens"] < 5 * 48  # rows of unequal length: padded batches
    assert report["per_layer"]["available"] and len(report["per_layer"]["layers"]) == TEXT_CONFIG.num_layers
    # every layer matched at fp32, the sequence classifier's pooled last layer at the last real token included
    assert max(layer["max_abs"] for layer in report["per_layer"]["layers"]) <= 1e-4
    assert max(o["max_abs"] for o in report["outputs"].values()) <= 1e-4


def test_fp16_head_and_a_wrong_reference_localised(tmp_path, capsys):
    write_head("text-classification", tmp_path / "ckpt", TEXT_CONFIG, seed=4, tokenizer=True)
    write_head("text-classification", tmp_path / "other", TEXT_CONFIG, seed=5)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "art16", ExportOptions(dtype="fp16"), log=lambda *_: None)
    report = run_compare(tmp_path / "art16", tmp_path / "ckpt", OPTIONS)
    assert report["precision"] == "fp16" and report["passed"]
    assert main(["compare", str(tmp_path / "art16"), "--reference", str(tmp_path / "other"), "--seq-len", "48",
                 "--windows", "5", "--report", str(tmp_path / "rep"), "--json"]) == 1
    wrong = json.loads(capsys.readouterr().out)
    assert not wrong["passed"] and wrong["localisation"]["first_layer"] == 0
    assert "(text-classification): FAIL" in (tmp_path / "rep" / "report.md").read_text()
