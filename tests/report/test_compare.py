"""neoxrt compare: fp32 passes, a corrupted artifact fails and is localised, perplexity agrees with an
independent transformers computation, files and exit codes."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from neox_testing import default_checkpoint, write_variant
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.manifest import file_sha256
from neoxrt.report.compare import CompareOptions, _windows, run_compare

QUIET = dict(log=lambda *_: None)
FAST = ["--windows", "6", "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "fp32"
    export_checkpoint(default_checkpoint(), out, ExportOptions(), **QUIET)
    return out


def corrupt(artifact, folder, weight="gpt_neox.layers.3.mlp.dense_4h_to_h.weight"):
    """A copy of the artifact with one weight element perturbed (manifest re-signed: a real-looking artifact)."""
    shutil.copytree(artifact, folder)
    model = onnx.load(str(folder / "model.onnx"))
    for tensor in model.graph.initializer:
        if tensor.name == weight:
            array = numpy_helper.to_array(tensor).copy()
            array[5, 7] += 3.0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save(model, str(folder / "model.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_sha256(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_fp32_passes_with_defaults_and_writes_the_report(artifact, tmp_path, capsys):
    code = main(["compare", str(artifact), "--reference", str(default_checkpoint()), "--report", str(tmp_path / "r"), *FAST])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("# neoxrt compare: PASS")
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["error_per_layer.png", "error_per_position.png", "report.json", "report.md"]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report) >= {"passed", "checks", "forward", "teacher_forced", "free_running", "per_layer", "localisation"}
    assert [c["name"] for c in report["checks"]] == ["logits_max_abs", "presents_max_abs", "top1_agreement",
                                                     "perplexity_delta_pct", "greedy_match_fraction"]


@pytest.mark.parametrize("layer", [1, 3])
def test_corrupted_artifact_fails_and_names_the_layer(artifact, tmp_path, capsys, layer):
    bad = corrupt(artifact, tmp_path / "bad", f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight")
    code = main(["compare", str(bad), "--reference", str(default_checkpoint()), "--json", *FAST])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["passed"]
    assert report["localisation"]["first_layer"] == layer
    assert f"layer {layer}" in report["localisation"]["message"]


def test_reference_perplexity_agrees_with_transformers(artifact):
    transformers = pytest.importorskip("transformers")
    report = run_compare(artifact, default_checkpoint(), CompareOptions(windows=6, max_new_tokens=4, progress=False))
    from tokenizers import Tokenizer

    from neoxrt.assets import EVAL_TEXT

    windows = _windows(Tokenizer.from_file(str(artifact / "tokenizer.json")), [EVAL_TEXT], 128, 6)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(default_checkpoint(), dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor(windows)
        loss = hf(input_ids=ids, labels=ids).loss  # mean NLL over every predicted token
    expected = float(np.exp(loss.item()))
    got = report["teacher_forced"]["perplexity_reference"]
    assert f"{got:.4g}" == f"{expected:.4g}", (got, expected)


def test_bad_input_exit_2(artifact, tmp_path, capsys):
    other = write_variant("gelu_parallel", tmp_path / "other")
    cases = {
        "missing artifact": ([str(tmp_path / "none"), "--reference", str(default_checkpoint())], "does not exist"),
        "bad threshold": ([str(artifact), "--reference", str(default_checkpoint()), "--threshold", "nope=1"],
                          "--threshold expects NAME=VALUE"),
        "wrong reference": ([str(artifact), "--reference", str(other)], "not the model the artifact was exported from"),
        "missing text": ([str(artifact), "--reference", str(default_checkpoint()), "--text", str(tmp_path / "x.txt")],
                         "file not found"),
    }
    for name, (args, fragment) in cases.items():
        assert main(["compare", *args, *FAST]) == 2, name
        err = capsys.readouterr().err
        assert fragment in err and err.strip().count("\n") == 0, (name, err)
