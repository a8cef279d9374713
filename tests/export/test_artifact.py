"""The artifact folder: contents, manifest, external data, interop with onnx.checker, Polygraphy and
optimum, and atomic failure on bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from neox_testing import PROMPTS, default_checkpoint, greedy, left_pad, ort_session, step_pairs, write_variant
from neoxrt import contract as io
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.model import load_model

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "default-fp32"
    export_checkpoint(default_checkpoint(), out, ExportOptions(attention="decomposed"), **QUIET)
    return out


def test_artifact_contents_and_manifest(default_artifact):
    names = sorted(p.name for p in default_artifact.iterdir())
    assert names == sorted([io.MODEL_FILE, io.TOKENIZER_FILE, io.CONFIG_FILE, io.GENERATION_CONFIG_FILE, io.MANIFEST_FILE])
    manifest = json.loads((default_artifact / io.MANIFEST_FILE).read_text())
    assert manifest["stage"] == "export" and manifest["opset"] == 17
    assert manifest["config"]["num_layers"] == 6
    assert len(manifest["checkpoint_sha256"]) == 64
    inputs = {t["name"]: t["shape"] for t in manifest["io"]["inputs"]}
    assert inputs[io.past_key(5)] == [io.BATCH, 4, io.PAST_SEQUENCE, 32]
    assert inputs[io.ATTENTION_MASK] == [io.BATCH, io.TOTAL_SEQUENCE]
    outputs = [t["name"] for t in manifest["io"]["outputs"]]
    assert outputs[0] == io.LOGITS and outputs[-1] == io.present_value(5)


def test_graph_has_no_if_and_passes_full_check(default_artifact):
    onnx.checker.check_model(str(default_artifact / io.MODEL_FILE), full_check=True)
    ops = {n.op_type for n in onnx.load(str(default_artifact / io.MODEL_FILE)).graph.node}
    assert "If" not in ops and "Loop" not in ops


def test_polygraphy_runs_it(default_artifact):
    shapes = ["input_ids:[2,3]", "attention_mask:[2,3]", "position_ids:[2,3]"]
    shapes += [f"past_key_values.{i}.{kv}:[2,4,0,32]" for i in range(6) for kv in ("key", "value")]
    polygraphy = os.path.join(os.path.dirname(sys.executable), "polygraphy")
    done = subprocess.run([polygraphy, "run", str(default_artifact / io.MODEL_FILE), "--onnxrt", "--input-shapes", *shapes],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout + done.stderr


def test_optimum_loads_decomposed_export_and_generates_our_tokens(default_artifact):
    optimum_ort = pytest.importorskip("optimum.onnxruntime")
    ort_model = optimum_ort.ORTModelForCausalLM.from_pretrained(default_artifact)
    ids, mask, _ = left_pad(PROMPTS)
    got = ort_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=1)[:, ids.shape[1]:]
    with torch.no_grad():
        assert torch.equal(got, greedy(load_model(default_checkpoint()), PROMPTS, 32))


def test_external_data_path(tmp_path):
    ckpt = write_variant("gelu_parallel", tmp_path / "ckpt")
    out = tmp_path / "art"
    export_checkpoint(ckpt, out, ExportOptions(external_data_threshold=0, kv_cache="dynamic"), **QUIET)
    assert json.loads((out / io.MANIFEST_FILE).read_text())["opset"] == 23  # fused attention, dynamic cache
    assert (out / io.WEIGHTS_FILE).stat().st_size > (out / io.MODEL_FILE).stat().st_size
    manifest = json.loads((out / io.MANIFEST_FILE).read_text())
    assert io.WEIGHTS_FILE in manifest["files"]
    model = load_model(ckpt)
    for _, mask, a, b, _, _ in step_pairs(ort_session(out / io.MODEL_FILE), model, PROMPTS, 2):
        rows = mask[:, -a.shape[1]:].numpy().astype(bool)
        assert np.abs(a - b)[rows].max() <= 1e-4


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys):
    ckpt = write_variant("gelu_parallel", tmp_path / "ckpt")
    existing = tmp_path / "exists"
    existing.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {
        "missing checkpoint": ([str(tmp_path / "none"), str(tmp_path / "o1")], "does not exist"),
        "existing output": ([str(ckpt), str(existing)], "already exists; pass --force"),
        "unwritable path": ([str(ckpt), str(a_file / "out")], "cannot write to"),
        "opset/flavour": ([str(ckpt), str(tmp_path / "o2"), "--attention", "fused", "--opset", "17"], "needs opset in 23"),
        "invalid checkpoint": ([str(a_file), str(tmp_path / "o3")], "expected a folder"),
    }
    for name, (args, fragment) in cases.items():
        assert main(["export", *args]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, (name, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    assert list(existing.iterdir()) == []
    assert _leftovers(tmp_path) == []


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from neoxrt.errors import ExportError
    from neoxrt.export import exporter

    ckpt = write_variant("gelu_parallel", tmp_path / "ckpt")

    def broken(_path):
        raise ExportError("the exported graph fails onnx.checker: simulated")

    monkeypatch.setattr(exporter, "validate_onnx", broken)
    with pytest.raises(ExportError):
        export_checkpoint(ckpt, tmp_path / "out", ExportOptions(), **QUIET)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_force_replaces_existing(tmp_path):
    ckpt = write_variant("gelu_parallel", tmp_path / "ckpt")
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, ExportOptions(), **QUIET)
    export_checkpoint(ckpt, out, ExportOptions(dtype="fp16"), force=True, **QUIET)
    assert json.loads((out / io.MANIFEST_FILE).read_text())["export_options"]["dtype"] == "fp16"
    assert _leftovers(tmp_path) == []
