"""TensorRT engines of the head graphs (sequence / token classification, question answering, feature
extraction: input_ids and attention_mask, no KV cache), on CPU: `neoxrt build`'s path up to the TensorRT call
(one profile over batch x sequence, the manifest's task and id2label) with the TensorRT calls replaced, and
`Classifier` running the engine folder through `TrtSession` over the stand-in (tests/trt_fakes.py: the
"engine" is the artifact's ONNX graph on ONNX Runtime) -- the same results as on ONNX Runtime."""

import json

import numpy as np
import pytest

from neox_testing import HEAD_QUESTION as QUESTION
from neox_testing import HEAD_TEXTS as TEXTS
from neox_testing import TEXT_CONFIG, export_heads
from neoxrt import contract as io
from neoxrt import tensorrt_api
from neoxrt.calibration.calibrate import calibrate_artifact
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.errors import BuildError
from neoxrt.export.engine import BuildOptions, build_engine_artifact, engine_profiles
from neoxrt.runtime import Classifier, trt_session
from neoxrt.runtime.ort_session import OrtSession
from trt_fakes import ENGINE, FakeApi, engine_artifact

QUIET = dict(log=lambda *_: None)
CONTEXT = "Barack Obama went to Paris in 2009, then to Berlin, and later he went to Rome and to Madrid in the spring."


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-heads")
    out = {task: art for task, (art, _) in export_heads(root, io.HEAD_TASKS).items()}
    calibrate_artifact(out[io.TEXT_CLASSIFICATION], root / "int8", CalibrationOptions(samples=4, seq_len=32),
                       progress=False, **QUIET)
    out["int8"] = root / "int8"
    return out


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """neoxrt.tensorrt_api without TensorRT: facts of a stand-in GPU, a build that records the profiles it is
    given, and sessions over FakeApi (the source artifact's ONNX graph)."""
    built = []

    def build(graph, shapes, options, log):
        built.append(shapes)
        return b"engine", None

    monkeypatch.setattr(tensorrt_api, "facts", lambda: dict(ENGINE))
    monkeypatch.setattr(tensorrt_api, "build_serialized_engine", build)
    real = trt_session.TrtSession

    def session(folder, manifest, api=None):
        source = json.loads((folder / io.MANIFEST_FILE).read_text())["source"]["artifact"]
        return real(folder, manifest, api=FakeApi(f"{source}/{io.MODEL_FILE}", manifest))

    monkeypatch.setattr(trt_session, "TrtSession", session)
    return built


def test_head_graphs_get_one_profile_over_batch_and_sequence(heads):
    for task in io.HEAD_TASKS:
        manifest = json.loads((heads[task] / io.MANIFEST_FILE).read_text())
        axes, shapes = engine_profiles(manifest, BuildOptions(max_batch=16, opt_batch=8))
        assert axes == {"prompt": {io.BATCH: [1, 8, 16], io.SEQUENCE: [1, 64, 64]}}, task  # T = the model's 64
        assert shapes["prompt"] == {io.INPUT_IDS: [[1, 1], [8, 64], [16, 64]],
                                    io.ATTENTION_MASK: [[1, 1], [8, 64], [16, 64]]}
    with pytest.raises(BuildError, match="--verify-tokens needs a text-generation artifact.*text-classification export"):
        engine_profiles(manifest | {"task": io.TEXT_CLASSIFICATION}, BuildOptions(verify_tokens=2))


@pytest.mark.parametrize("source", [io.TEXT_CLASSIFICATION, "int8"])
def test_build_writes_an_engine_manifest_with_task_and_labels(heads, tmp_path, fake_tensorrt, source):
    manifest = build_engine_artifact(heads[source], tmp_path / "engine", BuildOptions(max_batch=4), **QUIET)
    src = json.loads((heads[source] / io.MANIFEST_FILE).read_text())
    assert manifest["task"] == io.TEXT_CLASSIFICATION and manifest["id2label"] == src["id2label"]
    assert manifest["profile_order"] == ["prompt"] and manifest["profiles"]["prompt"][io.SEQUENCE] == [1, 64, 64]
    assert manifest["precision"] == ("int8" if source == "int8" else "fp32")
    assert fake_tensorrt == [{"prompt": {io.INPUT_IDS: [[1, 1], [4, 64], [4, 64]],
                                         io.ATTENTION_MASK: [[1, 1], [4, 64], [4, 64]]}}]
    assert (tmp_path / "engine" / io.TOKENIZER_FILE).is_file()


def test_classifier_runs_engine_folders_as_onnx_runtime_does(heads, tmp_path, fake_tensorrt):
    engines = {}
    for task in (io.TEXT_CLASSIFICATION, io.TOKEN_CLASSIFICATION, io.QUESTION_ANSWERING):
        build_engine_artifact(heads[task], tmp_path / task, BuildOptions(max_batch=2, max_context=32), **QUIET)
        engines[task] = Classifier.from_artifacts(tmp_path / task)
        assert type(engines[task].session).__name__ == "TrtSession"
        assert engines[task].batch_size == 2 and engines[task].max_positions == 32  # the engine's profile
    ref = {t: Classifier.from_artifacts(heads[t]) for t in engines}
    for got, want in zip(engines[io.TEXT_CLASSIFICATION].classify(TEXTS), ref[io.TEXT_CLASSIFICATION].classify(TEXTS)):
        assert got.label == want.label
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    for got, want in zip(engines[io.TOKEN_CLASSIFICATION].tag(TEXTS), ref[io.TOKEN_CLASSIFICATION].tag(TEXTS)):
        assert [(t.start, t.end, t.label) for t in got] == [(t.start, t.end, t.label) for t in want]
        np.testing.assert_allclose([t.score for t in got], [t.score for t in want], atol=1e-5)
    # the engine holds 32 tokens: the context is split into windows, as ONNX Runtime does with max_length 32
    got = engines[io.QUESTION_ANSWERING].answer(QUESTION, CONTEXT)
    want = ref[io.QUESTION_ANSWERING].answer(QUESTION, CONTEXT, max_length=32)
    assert (got.answer, got.start, got.end) == (want.answer, want.start, want.end)
    assert abs(got.score - want.score) < 1e-5
    api = engines[io.TEXT_CLASSIFICATION].session.api
    assert {p for p, _ in api.steps} == {"prompt"} and max(s[io.INPUT_IDS][0] for _, s in api.steps) == 2


def test_feature_extraction_engine_runs_like_onnx_runtime(heads, tmp_path):
    folder, manifest = engine_artifact(heads[io.FEATURE_EXTRACTION], tmp_path / "engine", max_context=64)
    session = trt_session.TrtSession(folder, manifest, api=FakeApi(heads[io.FEATURE_EXTRACTION] / io.MODEL_FILE, manifest))
    ids = np.array([[5, 17, 33, 2, 90], [12, 3, 0, 0, 0]], np.int64)
    feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: (np.arange(5) < np.array([[5], [2]])).astype(np.int64)}
    got = session.run(feeds)
    want = OrtSession(heads[io.FEATURE_EXTRACTION] / io.MODEL_FILE).run(feeds)
    assert set(got) == {io.LAST_HIDDEN_STATE} and got[io.LAST_HIDDEN_STATE].shape == (2, 5, TEXT_CONFIG.hidden_size)
    np.testing.assert_allclose(got[io.LAST_HIDDEN_STATE], want[io.LAST_HIDDEN_STATE], atol=1e-5)
    assert session.num_layers == 0 and session.verify_tokens == 0
