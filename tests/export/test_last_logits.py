"""--logits last: the graph returns the last position's logits only ([B, 1, V]); same tokens, same numbers
at that position, and neoxrt compare still proves it (teacher-forced through the artifact's decoder)."""

import json

import numpy as np
import onnx
import pytest

from neox_testing import default_checkpoint, ort_session
from neoxrt import contract as io
from neoxrt.errors import ExportError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.export.tensorrt_graph import check_tensorrt_support, tensorrt_ready
from neoxrt.report.compare import CompareOptions, run_compare
from neoxrt.runtime import Generator

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("last")
    export_checkpoint(default_checkpoint(), root / "all", ExportOptions(kv_cache="dynamic"), **QUIET)
    export_checkpoint(default_checkpoint(), root / "last", ExportOptions(logits="last", kv_cache="dynamic"), **QUIET)
    return root / "all", root / "last"


def test_last_position_logits_equal_the_full_graphs_last_row(pair):
    full, last = (ort_session(p / io.MODEL_FILE, "fused") for p in pair)
    ids = np.array([[0, 0, 5, 17, 33], [12, 3, 64, 65, 66]], np.int64)
    mask = (np.arange(5)[None] >= np.array([[2], [0]])).astype(np.int64)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feeds = io.prompt_feeds(ids, mask, pos, 6, 4, 32, "float32")
    a = full.run([io.LOGITS], feeds)[0]
    b = last.run([io.LOGITS], feeds)[0]
    assert b.shape == (2, 1, a.shape[-1])
    np.testing.assert_allclose(b[:, 0], a[:, -1], atol=1e-5)
    manifest = json.loads((pair[1] / io.MANIFEST_FILE).read_text())
    assert manifest["io"]["outputs"][0]["shape"] == [io.BATCH, 1, a.shape[-1]]
    assert manifest["export_options"]["logits"] == "last"
    assert check_tensorrt_support(tensorrt_ready(onnx.load(str(pair[1] / io.MODEL_FILE)))) == []


def test_generation_is_identical_and_compare_still_proves_it(pair):
    prompts = ["The state of the Union is", "Gentlemen of the Senate"]
    a, b = (Generator.from_artifacts(p).generate(prompts, max_new_tokens=16).ids for p in pair)
    assert a == b
    report = run_compare(pair[1], default_checkpoint(), CompareOptions(progress=False, windows=4, max_new_tokens=8))
    assert report["passed"]
    assert report["teacher_forced"]["tokens"] == 4 * 127 and report["teacher_forced"]["top1_agreement"] == 1.0


def test_bad_logits_option_is_refused():
    with pytest.raises(ExportError, match="--logits must be one of all, last"):
        ExportOptions(logits="first")
