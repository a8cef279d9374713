"""TensorRT engines on a GPU (marker `gpu`: skipped with the reason where TensorRT or a GPU is missing;
see tests/conftest.py). `make gpu-check` runs the fuller script with timings."""

import pytest

from neox_testing import default_checkpoint, greedy
from neoxrt.calibration.calibrate import calibrate_artifact
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.export.engine import BuildOptions, build_engine_artifact
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.model import load_model
from neoxrt.report.compare import CompareOptions, run_compare
from neoxrt.runtime import Generator

pytestmark = pytest.mark.gpu
QUIET = dict(log=lambda *_: None)
PROMPT = [[5, 17, 33, 2, 90, 41, 7]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    export_checkpoint(default_checkpoint(), root / "fp32", ExportOptions(), **QUIET)
    export_checkpoint(default_checkpoint(), root / "fp16", ExportOptions(dtype="fp16"), **QUIET)
    export_checkpoint(default_checkpoint(), root / "plugin", ExportOptions(dtype="fp16", attention="plugin"), **QUIET)
    export_checkpoint(default_checkpoint(), root / "static", ExportOptions(dtype="fp16", kv_cache="static"), **QUIET)
    calibrate_artifact(root / "fp32", root / "int8", CalibrationOptions(), progress=False, **QUIET)
    out = {}
    for name, plugin in (("fp16", False), ("int8", False), ("plugin", True), ("static", False)):
        options = BuildOptions(max_batch=4, max_context=256, plugin=plugin, verify_tokens=0 if plugin else 4)
        build_engine_artifact(root / name, root / f"engine-{name}", options, **QUIET)
        out[name] = root / f"engine-{name}"
    return out


@pytest.mark.parametrize("name", ["fp16", "int8", "plugin", "static"])
def test_engine_passes_its_accuracy_report(engines, name):
    report = run_compare(engines[name], default_checkpoint(), CompareOptions(progress=False, windows=4, max_new_tokens=16))
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]


def test_fp16_engine_generates_pytorch_greedy_tokens(engines):
    want = greedy(load_model(default_checkpoint()), PROMPT, 16)[0].tolist()
    got = Generator.from_artifacts(engines["fp16"]).generate(PROMPT, max_new_tokens=16).ids[0]
    assert sum(a == b for a, b in zip(got, want)) >= 12


def test_plugin_engine_agrees_with_the_native_attention_engine(engines):
    a = Generator.from_artifacts(engines["fp16"]).generate(PROMPT, max_new_tokens=16).ids[0]
    b = Generator.from_artifacts(engines["plugin"]).generate(PROMPT, max_new_tokens=16).ids[0]
    assert a == b


def test_static_engine_replays_one_cuda_graph_and_agrees_with_the_dynamic_engine(engines):
    a = Generator.from_artifacts(engines["fp16"]).generate(PROMPT, max_new_tokens=16).ids[0]
    gen = Generator.from_artifacts(engines["static"])
    assert gen.generate(PROMPT, max_new_tokens=16).ids[0] == a
    assert list(gen.session.graphs) == [(1, 64)]  # captured once; the second generation replays it
    assert gen.generate(PROMPT, max_new_tokens=16).ids[0] == a and len(gen.session.graphs) == 1
    gen.session.close()
    assert not gen.session.graphs


@pytest.mark.parametrize("name", ["fp16", "static"])
def test_speculative_decoding_on_engines_built_with_verify_tokens(engines, name):
    """The INT8 engine drafts, the FP16 engine verifies K + 1 tokens per step (its verify profile). In FP16 a
    step of K + 1 tokens may round differently from K + 1 single steps, so a near-tie may flip: the tokens are
    compared with the target alone over a prefix, and nearly all of them overall."""
    want = Generator.from_artifacts(engines[name]).generate(PROMPT, max_new_tokens=16).ids[0]
    spec = Generator.from_artifacts(engines[name], draft=engines["int8"])
    got = spec.generate(PROMPT, max_new_tokens=16, num_draft_tokens=4).ids[0]
    assert got[:8] == want[:8] and sum(a == b for a, b in zip(got, want)) >= 14, (got, want)
    assert spec.spec_stats["rounds"] < 15 and spec.spec_stats["accepted"] > 0
    lookup = Generator.from_artifacts(engines[name]).generate(PROMPT, max_new_tokens=16, prompt_lookup_tokens=3)
    assert lookup.ids[0][:8] == want[:8]


def test_head_engines_classify_as_the_onnx_export_does(tmp_path):
    """A sequence-classification head (fp16 export, and its W8A8 INT8 artifact) built into engines: the
    labels of the fp32 export on ONNX Runtime."""
    from neox_testing import TEXT_CONFIG, write_head
    from neoxrt.runtime import Classifier

    texts = ["I loved every minute of it.", "Terrible.", "The union is strong, and the economy is sound today."]
    write_head("text-classification", tmp_path / "ckpt", TEXT_CONFIG, seed=3, tokenizer=True)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "fp32", ExportOptions(), **QUIET)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "fp16", ExportOptions(dtype="fp16"), **QUIET)
    calibrate_artifact(tmp_path / "fp32", tmp_path / "int8", CalibrationOptions(), progress=False, **QUIET)
    want = [r.label for r in Classifier.from_artifacts(tmp_path / "fp32").classify(texts)]
    for name in ("fp16", "int8"):
        build_engine_artifact(tmp_path / name, tmp_path / f"engine-{name}", BuildOptions(max_batch=4), **QUIET)
        got = Classifier.from_artifacts(tmp_path / f"engine-{name}").classify(texts)
        assert [r.label for r in got] == want, name
