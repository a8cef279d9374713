"""Fuzz (hypothesis): one manifest.json key deleted, retyped or added anywhere in the tree (files and io
included), then `neoxrt generate` on the artifact. The contract: exit 0 with the tokens of the untouched
artifact (a prefix of them: an edited eos may stop it early), or exit 2 with one line naming the key (the
top-level section or the key itself) -- never a traceback."""

import io as stdio
import json
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from fuzzing import budget, fuzz, one_line
from hypothesis import event, given
from hypothesis import strategies as st

from neox_testing import write_variant
from neoxrt import contract as io
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions

HOSTILE = [None, True, False, 0, -1, 7, 2**70, 1.5, float("nan"), float("inf"), "", "x", "../model.onnx", [], [1], {},
           {"a": 1}]
ARGS = ["--input-ids", "1,2,3", "--max-new-tokens", "3", "--json"]


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _run(art: Path) -> tuple[int, str, str]:
    out, err = stdio.StringIO(), stdio.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["generate", str(art), *ARGS])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-manifest")
    ckpt = write_variant("gelu_parallel", root / "ckpt")
    export_checkpoint(ckpt, root / "art", ExportOptions(), log=lambda *_: None)
    code, out, err = _run(root / "art")
    assert code == 0, err
    manifest = json.loads((root / "art" / io.MANIFEST_FILE).read_text())
    return root / "art", manifest, json.loads(out)["ids"][0]




@fuzz
@budget(100)
@given(data=st.data(), op=st.sampled_from(["delete", "retype", "add"]), value=st.sampled_from(HOSTILE))
def test_any_manifest_edit_runs_or_is_named(artifact, data, op, value):
    art, manifest, want = artifact
    paths = sorted(_paths(manifest), key=lambda p: tuple(map(str, p)))
    path = data.draw(st.sampled_from(paths), label="path")
    edited = json.loads(json.dumps(manifest))
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    leaf = path[-1]
    if op == "delete":
        del parent[leaf]
    elif op == "retype":
        parent[leaf] = value
    elif isinstance(parent, dict):
        parent[f"extra_{leaf}"] = value
    else:
        parent.append(value)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "art"
        shutil.copytree(art, copy)
        (copy / io.MANIFEST_FILE).write_text(json.dumps(edited))
        code, out, err = _run(copy)
    if code == 0:
        event(f"accepted: {op}")
        ids = json.loads(out)["ids"][0]
        assert ids and ids == want[:len(ids)], (path, op, value, ids, want)
        return
    event(f"refused: {op}")
    assert code == 2, (path, op, value, err)
    message = one_line(err)
    names = {str(path[0]), str(leaf), ".".join(map(str, path))}
    assert any(n in message for n in names), (path, op, value, message)
