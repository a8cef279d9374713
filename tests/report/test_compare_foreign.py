"""neoxrt compare on graphs neoxrt did not write (Optimum's export, as a folder and as a bare file), on our
artifacts after a file changed (--allow-modified), and against another artifact (--against)."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from neox_testing import default_checkpoint
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.model import load_model

QUIET = dict(log=lambda *_: None)
FAST = ["--windows", "4", "--max-new-tokens", "12", "--json"]
REF = ["--reference", str(default_checkpoint())]


@pytest.fixture(scope="module")
def optimum_export(tmp_path_factory):
    optimum_ort = pytest.importorskip("optimum.onnxruntime")
    out = tmp_path_factory.mktemp("optimum") / "export"
    optimum_ort.ORTModelForCausalLM.from_pretrained(default_checkpoint(), export=True).save_pretrained(out)
    return out


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_optimum_export_passes_as_folder_and_as_bare_file(optimum_export, capsys):
    assert main(["compare", str(optimum_export), *REF, *FAST]) == 0
    report = _report(capsys)
    assert report["artifact_kind"] == "onnx folder" and report["precision"] == "fp32"
    assert report["per_layer"]["method"] == "Optimum/TorchScript node names"
    assert main(["compare", str(optimum_export / "model.onnx"), *REF, *FAST]) == 0
    assert _report(capsys)["artifact_kind"] == "onnx file"


def _perturbed(optimum_export, folder, strip_names: bool):
    """Optimum's export with layer 3's MLP input weight changed (found by value: Optimum leaves MatMul weights
    unnamed); optionally every node name removed, so only the weights can localise it."""
    shutil.copytree(optimum_export, folder)
    model = onnx.load(str(folder / "model.onnx"))
    want = load_model(default_checkpoint()).state_dict()["layers.3.mlp_in.weight"].numpy().T
    hit = 0
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.shape == want.shape and np.array_equal(array, want):
            array = array.copy()
            array[:, :8] += 0.5
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            hit += 1
    assert hit == 1
    if strip_names:
        for node in model.graph.node:
            node.name = ""
    onnx.save(model, str(folder / "model.onnx"))
    return folder


@pytest.mark.parametrize("strip_names", [False, True])
def test_perturbed_layer_fails_and_is_named(optimum_export, tmp_path, capsys, strip_names):
    folder = _perturbed(optimum_export, tmp_path / "bad", strip_names)
    assert main(["compare", str(folder), *REF, *FAST]) == 1
    report = _report(capsys)
    assert not report["passed"] and report["localisation"]["first_layer"] == 3, report["localisation"]
    method = "weights compared with the checkpoint's" if strip_names else "Optimum/TorchScript node names"
    assert report["localisation"]["method"] == method


def test_contract_mismatch_is_one_line(optimum_export, tmp_path, capsys):
    from neox_testing import write_variant

    other = write_variant("gelu_parallel", tmp_path / "other")
    assert main(["compare", str(optimum_export), "--reference", str(other), *FAST]) == 2
    err = capsys.readouterr().err
    want = "has 6 layers, 4 heads of size 32, vocabulary 50304; the reference has 2, 4 of size 16, 128"
    assert err.count("\n") == 1 and want in err


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    root = tmp_path_factory.mktemp("ours")
    export_checkpoint(default_checkpoint(), root / "fp32", ExportOptions(), **QUIET)
    export_checkpoint(default_checkpoint(), root / "fp16", ExportOptions(dtype="fp16"), **QUIET)
    return root


def test_modified_artifact_refused_then_compared_with_the_flag(ours, tmp_path, capsys):
    art = tmp_path / "mod"
    shutil.copytree(ours / "fp32", art)
    config = json.loads((art / "config.json").read_text())
    (art / "config.json").write_text(json.dumps({**config, "note": "edited by another tool"}))
    assert main(["compare", str(art), *REF, *FAST]) == 2
    assert "config.json does not match its manifest" in capsys.readouterr().err
    assert main(["compare", str(art), *REF, *FAST, "--allow-modified"]) == 0
    modified = _report(capsys)["modified_files"]
    assert [m["file"] for m in modified] == ["config.json"] and len(modified[0]["found_sha256"]) == 64


def test_against_another_artifact(ours, capsys):
    assert main(["compare", str(ours / "fp16"), "--against", str(ours / "fp32"), *FAST]) == 0
    report = _report(capsys)
    assert report["reference_kind"] == "artifact" and report["precision"] == "fp16"
    assert report["per_layer"]["available"] and report["per_layer"]["method"] == "neoxrt's named hidden states"
    assert main(["compare", str(ours / "fp16"), *FAST]) == 2  # neither --reference nor --against
    assert "one of the two" in capsys.readouterr().err
