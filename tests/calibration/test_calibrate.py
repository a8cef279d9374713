"""neoxrt calibrate end to end on the trained default model: accuracy against PyTorch, the runtime runs the
artifact, the cache, the range summary, and every bad input as one line with exit 2 and nothing written."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from neox_testing import assert_refused, default_checkpoint
from neoxrt.calibration.calibrate import CACHE_FILE, RANGES_FILE, SUMMARY_FILE, calibrate_artifact
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.errors import CalibrationError
from neoxrt.export.exporter import GRAPH_VERSION, export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.manifest import file_sha256, write_manifest
from neoxrt.report.compare import CompareOptions, run_compare
from neoxrt.runtime import Generator

QUIET = dict(log=lambda *_: None, progress=False)
SMALL = CalibrationOptions(samples=16, seq_len=64)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "fp32"
    export_checkpoint(default_checkpoint(), out, ExportOptions(), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def int8(fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "int8"
    calibrate_artifact(fp32, out, CalibrationOptions(), **QUIET)  # the defaults: percentile, SmoothQuant 0.5
    return out


def _check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)["value"]


def test_int8_meets_the_accuracy_bar_against_pytorch(int8):
    report = run_compare(int8, default_checkpoint(), CompareOptions(progress=False, max_new_tokens=16))
    assert report["precision"] == "int8"
    assert _check(report, "perplexity_delta_pct") <= 2.0
    assert _check(report, "top1_agreement") >= 0.95
    assert report["passed"]


def test_int8_artifact_is_an_ordinary_artifact(fp32, int8):
    src, dst = (json.loads((p / "manifest.json").read_text()) for p in (fp32, int8))
    assert dst["stage"] == "calibrate" and dst["io"] == src["io"]
    assert dst["graph_version"] == src["graph_version"] == GRAPH_VERSION  # the benches' cache key
    assert dst["source"]["model_sha256"] == src["files"]["model.onnx"]
    assert dst["quantization"]["matmuls"] == 25 and dst["quantization"]["smoothquant_layernorms"] == 13
    gen = Generator.from_artifacts(int8, threads=1)
    out = gen.generate(["The state of the Union is"], max_new_tokens=8)
    assert len(out.ids[0]) == 8
    summary = (int8 / SUMMARY_FILE).read_text()
    assert "SmoothQuant alpha 0.5" in summary and summary.count("\n| /") == 25
    rows = json.loads((int8 / RANGES_FILE).read_text())
    assert all(r["threshold"] <= r["absmax_after_smoothing"] + 1e-6 for r in rows)


def test_the_cache_is_reused_for_the_same_inputs_and_refused_for_others(fp32, tmp_path):
    out, logs = tmp_path / "a", []
    calibrate_artifact(fp32, out, SMALL, **QUIET)
    first = file_sha256(out / "model.onnx")
    calibrate_artifact(fp32, out, SMALL, force=True, log=logs.append, progress=False)
    assert any("reusing calibration cache" in line for line in logs)
    assert file_sha256(out / "model.onnx") == first
    other = CalibrationOptions(samples=16, seq_len=64, method="minmax")
    with pytest.raises(CalibrationError, match="method 'percentile' vs 'minmax'.*--recalibrate"):
        calibrate_artifact(fp32, out, other, force=True, **QUIET)
    assert file_sha256(out / "model.onnx") == first  # the refused run changed nothing
    calibrate_artifact(fp32, out, other, force=True, recalibrate=True, **QUIET)
    assert file_sha256(out / "model.onnx") != first
    shared = tmp_path / "shared.npz"
    calibrate_artifact(fp32, tmp_path / "b", other, cache=shared, **QUIET)
    assert shared.is_file()
    logs.clear()
    calibrate_artifact(fp32, tmp_path / "c", other, cache=shared, log=logs.append, progress=False)
    assert any("reusing" in line for line in logs)


def test_smoothquant_tames_an_outlier_channel(fp32, tmp_path):
    """Make channel 7 of layer 2's input_layernorm output 40x louder (weights scaled back: same function);
    the summary flags the outlier and SmoothQuant brings the tensor's outlier ratio down."""
    loud = tmp_path / "loud"
    loud.mkdir()
    for f in fp32.iterdir():
        (loud / f.name).write_bytes(f.read_bytes())
    model = onnx.load(str(loud / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}

    def scale(name, index, by):
        a = numpy_helper.to_array(inits[name]).copy()
        a[index] *= by
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    scale("gpt_neox.layers.2.input_layernorm.weight", 7, 40.0)
    scale("gpt_neox.layers.2.input_layernorm.bias", 7, 40.0)
    scale("gpt_neox.layers.2.attention.query_key_value.weight", (7, slice(None)), 1 / 40.0)
    onnx.save(model, str(loud / "model.onnx"))
    manifest = json.loads((loud / "manifest.json").read_text())
    files = list(manifest.pop("files"))
    body = {k: v for k, v in manifest.items() if k not in ("toolkit", "toolkit_version", "stage")}
    write_manifest(loud, "export", body, files)
    plain, smooth = tmp_path / "plain", tmp_path / "smooth"
    calibrate_artifact(loud, plain, CalibrationOptions(samples=16, seq_len=64, method="minmax", smoothquant=None), **QUIET)
    calibrate_artifact(loud, smooth, CalibrationOptions(samples=16, seq_len=64, method="minmax"), **QUIET)
    name = "/layers.2/attention/LayerNormalization_output_0"
    row = {r["activation"]: r for r in json.loads((smooth / RANGES_FILE).read_text())}[name]
    assert row["outlier_ratio"] > 20 and row["outlier_ratio_after"] < 5
    assert name in json.loads((smooth / "manifest.json").read_text())["calibration"]["outlier_tensors"]
    assert "**outliers**" in (plain / SUMMARY_FILE).read_text()
    reports = {p: run_compare(p, default_checkpoint(), CompareOptions(progress=False, windows=6, max_new_tokens=8))
               for p in (plain, smooth)}
    kl = {p: r["teacher_forced"]["kl_mean"] for p, r in reports.items()}
    assert kl[smooth] < kl[plain] / 3, kl  # measured: 0.0016 plain, 0.0002 smoothed
    assert _check(reports[smooth], "top1_agreement") > _check(reports[plain], "top1_agreement")


def test_weights_only_and_the_dynamic_baseline_need_no_data_and_run(fp32, tmp_path):
    for name, options in (("w", CalibrationOptions(weights_only=True)), ("d", CalibrationOptions(method="ort-dynamic"))):
        calibrate_artifact(fp32, tmp_path / name, options, data=[tmp_path / "missing.txt"], **QUIET)
        assert not (tmp_path / name / CACHE_FILE).exists()
        report = run_compare(tmp_path / name, default_checkpoint(), CompareOptions(progress=False, windows=6, max_new_tokens=8))
        assert _check(report, "top1_agreement") >= 0.95, name


def test_weights_only_artifact_tells_onnx_runtime_its_matmulnbits_block(fp32, int8, tmp_path):
    """The block recorded in the manifest reaches ONNX Runtime: the optimized graph's MatMulNBits use it
    (the default model: K = 128 and 512, so 128 rather than ONNX Runtime's default 32)."""
    import onnxruntime as ort

    from neoxrt.calibration.qdq import ORT_NBITS_BLOCK_KEY
    from neoxrt.manifest import ORT_SESSION_CONFIG
    from neoxrt.runtime.ort_session import OrtSession

    manifest = calibrate_artifact(fp32, tmp_path / "w", CalibrationOptions(weights_only=True), **QUIET)
    assert manifest[ORT_SESSION_CONFIG] == {ORT_NBITS_BLOCK_KEY: "128"}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    OrtSession(tmp_path / "w" / "model.onnx", options=options, config=manifest[ORT_SESSION_CONFIG])
    blocks = {a.i for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {128}
    static = json.loads((int8 / "manifest.json").read_text())
    assert ORT_SESSION_CONFIG not in static  # W8A8 graphs run as MatMulIntegerToFloat: no block to choose


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "fp16"
    export_checkpoint(default_checkpoint(), out, ExportOptions(dtype="fp16"), log=lambda *_: None)
    return out


def test_bad_input_is_one_line_exit_2_and_nothing_written(fp32, fp16, tmp_path, capsys):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    short.write_text("only a few words")
    calibrate_artifact(fp32, tmp_path / "cached", SMALL, **QUIET)
    cases = [
        ([str(fp32), "OUT", "--data", str(empty)], "is empty"),
        ([str(fp32), "OUT", "--data", str(short)], "need at least one window of --seq-len 128"),
        ([str(fp32), "OUT", "--data", str(tmp_path / "nope.txt")], "file not found"),
        ([str(fp16), "OUT"], "is fp16; calibration needs an fp32 export"),
        ([str(tmp_path / "cached"), "OUT"], "expected stage export, found 'calibrate'"),
        ([str(fp32), "OUT", "--samples", "0"], "argument --samples: expected an integer in [1, 2**31), got 0"),
        ([str(fp32), "OUT", "--cache", str(tmp_path / "cached" / CACHE_FILE), "--samples", "16", "--seq-len", "32"],
         "was made for other inputs (seq_len 64 vs 32)"),
    ]
    assert_refused("calibrate", cases, tmp_path, capsys)
    assert np.all([p.name != "out" for p in tmp_path.iterdir()])
