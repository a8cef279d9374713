"""The streamed export: same graph and bytes as the in-memory one, memory that does not grow with depth,
checkpoints as they come (sharded, .bin, bf16, old buffers), bad checkpoints refused with nothing written,
and integrity checks that scale (sampled at load, full in `neoxrt verify`)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from neox_testing import FORMAT_CASES, VARIANTS, write_variant
from neoxrt import contract as io
from neoxrt import manifest as manifest_mod
from neoxrt.cli import main
from neoxrt.errors import ArtifactError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.external_data import ALIGN
from neoxrt.export.neox_onnx import onnx_from_model
from neoxrt.export.options import ExportOptions
from neoxrt.manifest import read_manifest
from neoxrt.model import load_model, random_model, save_checkpoint
from neoxrt.model.weights import open_checkpoint

QUIET = dict(log=lambda *_: None)
STREAM = dict(external_data_threshold=0)  # every weight through model.onnx.data


def _initializers(path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in graph.initializer}


OPTION_CASES = [dict(attention="decomposed"), dict(attention="fused", dtype="fp16"), dict(attention="plugin"),
                dict(attention="fused", logits="last"), dict(attention="fused", kv_cache="static")]


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: "-".join(o.values()))
def test_streamed_graph_equals_in_memory_graph(options, tmp_path):
    ckpt = write_variant("head_dim_96_rotary_24", tmp_path / "ckpt", fmt="sharded")
    export_checkpoint(ckpt, tmp_path / "art", ExportOptions(**options, **STREAM), **QUIET)
    streamed = onnx.load(str(tmp_path / "art" / io.MODEL_FILE), load_external_data=False)
    reference = onnx_from_model(load_model(ckpt), ExportOptions(**options))
    assert [n.op_type for n in streamed.graph.node] == [n.op_type for n in reference.graph.node]
    assert [i.name for i in streamed.graph.input] == [i.name for i in reference.graph.input]
    got = _initializers(tmp_path / "art" / io.MODEL_FILE)
    want = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    external = [t for t in streamed.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(int({e.key: e.value for e in t.external_data}["offset"]) % ALIGN == 0 for t in external)
    onnx.checker.check_model(str(tmp_path / "art" / io.MODEL_FILE), full_check=True)


@pytest.mark.parametrize("fmt,dtype", FORMAT_CASES)
def test_every_checkpoint_format_streams_to_the_same_weights(fmt, dtype, tmp_path):
    ckpt = write_variant("tied_embeddings", tmp_path / "ckpt", fmt=fmt, dtype=dtype)
    export_checkpoint(ckpt, tmp_path / "art", ExportOptions(**STREAM), **QUIET)
    got = _initializers(tmp_path / "art" / io.MODEL_FILE)
    want = {t.name: numpy_helper.to_array(t) for t in onnx_from_model(load_model(ckpt), ExportOptions()).graph.initializer}
    assert all(np.array_equal(got[n], w) for n, w in want.items())


def test_old_buffers_are_ignored(tmp_path):
    model = random_model(VARIANTS["gelu_parallel"])
    for fmt in ("safetensors", "bin"):
        folder = save_checkpoint(model, tmp_path / fmt, fmt=fmt)
        name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
        if fmt == "safetensors":
            from safetensors.torch import load_file, save_file

            state = load_file(str(folder / name))
        else:
            state = torch.load(folder / name, weights_only=True)
        for i in range(2):
            state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
            state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
            state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        if fmt == "safetensors":
            save_file(state, str(folder / name))
        else:
            torch.save(state, folder / name)
        export_checkpoint(folder, tmp_path / f"art-{fmt}", ExportOptions(**STREAM), **QUIET)


def _shard_cases(tmp_path):
    def sharded(name):
        return write_variant("gelu_parallel", tmp_path / name, fmt="sharded")

    missing = sharded("missing")
    (missing / "model-00002-of-00002.safetensors").unlink()
    truncated = sharded("truncated")
    shard = truncated / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    phantom = sharded("phantom")
    index = json.loads((phantom / "model.safetensors.index.json").read_text())
    index["weight_map"]["gpt_neox.layers.7.mlp.dense_4h_to_h.weight"] = "model-00001-of-00002.safetensors"
    (phantom / "model.safetensors.index.json").write_text(json.dumps(index))
    nan = write_variant("gelu_parallel", tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    state = load_file(str(nan / "model.safetensors"))
    state["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"][5, 3] = float("nan")
    save_file(state, str(nan / "model.safetensors"))
    inf16 = write_variant("gelu_parallel", tmp_path / "inf16", dtype="fp16")
    state = load_file(str(inf16 / "model.safetensors"))
    state["embed_out.weight"][100, 63] = -float("inf")
    save_file(state, str(inf16 / "model.safetensors"))
    ints = write_variant("gelu_parallel", tmp_path / "ints")
    state = load_file(str(ints / "model.safetensors"))
    state["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(64, 64, dtype=torch.int8)
    save_file(state, str(ints / "model.safetensors"))
    return {
        "missing shard": (missing, "model-00002-of-00002.safetensors not found"),
        "truncated shard": (truncated, "model-00001-of-00002.safetensors is truncated"),
        "index names a tensor no shard has": (phantom, "names tensors no shard has: gpt_neox.layers.7.mlp.dense_4h_to_h.weight"),
        "NaN weight": (nan, "gpt_neox.layers.1.mlp.dense_h_to_4h.weight has a non-finite value (nan) at index [5, 3]"),
        "inf fp16 weight (transposed when written)": (inf16, "embed_out.weight has a non-finite value (-inf) at index [100, 63]"),
        "int8 weight": (ints, "gpt_neox.layers.0.attention.dense.weight in model.safetensors has dtype I8; expected a float"),
    }


def test_bad_checkpoints_exit_2_and_write_nothing(tmp_path, capsys):
    for name, (folder, fragment) in _shard_cases(tmp_path).items():
        out = tmp_path / f"out-{folder.name}"
        assert main(["export", str(folder), str(out), "--external-data-threshold", "0"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), name


# VmHWM, not ru_maxrss: a child forked from this (large) test process inherits its RSS in ru_maxrss
PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import ExportOptions
    export_checkpoint(sys.argv[1], sys.argv[2], ExportOptions(external_data_threshold=0), log=lambda *_: None)
    print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
""")


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """Each export runs in a fresh child (started from this small test process) that reports its own peak."""
    base = dict(VARIANTS["gelu_parallel"].to_dict(), hidden_size=512, intermediate_size=2048, num_heads=8, vocab_size=256)
    peaks, weights = {}, {}
    for layers in (2, 16):
        config = type(VARIANTS["gelu_parallel"])(**{**base, "num_layers": layers})
        ckpt = save_checkpoint(random_model(config), tmp_path / f"ckpt{layers}")
        weights[layers] = (ckpt / "model.safetensors").stat().st_size
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ckpt), str(tmp_path / f"art{layers}")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[layers] = int(done.stdout.split()[-1])
    grown = peaks[16] - peaks[2]
    # 14 more layers are 14 x 12.6 MB = 176 MB of weights; the in-memory export held them all (and more)
    assert grown < 0.25 * (weights[16] - weights[2]), (peaks, weights)


@pytest.fixture()
def large_artifact(tmp_path, monkeypatch):
    """An artifact whose weights file counts as large (sampled at load)."""
    monkeypatch.setattr(manifest_mod, "FULL_HASH_BYTES", 64 << 10)
    monkeypatch.setattr(manifest_mod, "SAMPLE_BYTES", 1024)  # samples far apart in this small file
    ckpt = write_variant("gelu_parallel", tmp_path / "ckpt")
    out = tmp_path / "art"
    export_checkpoint(ckpt, out, ExportOptions(**STREAM), **QUIET)
    return out


def _flip(path, offset):
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _unsampled_offset(path) -> int:
    """A byte no sampled block covers."""
    size, n, block = path.stat().st_size, manifest_mod.SAMPLES, manifest_mod.SAMPLE_BYTES
    starts = [(size - block) * i // (n - 1) for i in range(n)]
    return starts[1] + block + ((starts[2] - starts[1] - block) // 2)


def test_large_files_checked_by_size_and_samples_and_verify_rehashes(large_artifact, capsys):
    manifest = json.loads((large_artifact / io.MANIFEST_FILE).read_text())
    data = large_artifact / io.WEIGHTS_FILE
    assert list(manifest["file_checks"]) == [io.WEIGHTS_FILE]
    assert manifest["files"][io.WEIGHTS_FILE] == manifest_mod.file_sha256(data)  # hashed while written
    read_manifest(large_artifact, ("export",))
    assert main(["verify", str(large_artifact)]) == 0
    assert "every sha256 matches" in capsys.readouterr().out
    _flip(data, data.stat().st_size - 10)  # inside the last sampled block: refused at load
    with pytest.raises(ArtifactError, match="model.onnx.data does not match its manifest \\(sampled sha256 differs\\)"):
        read_manifest(large_artifact, ("export",))
    _flip(data, data.stat().st_size - 10)
    read_manifest(large_artifact, ("export",))
    _flip(data, _unsampled_offset(data))  # between samples: only the full check sees it
    read_manifest(large_artifact, ("export",))
    assert main(["verify", str(large_artifact)]) == 2
    assert "model.onnx.data does not match its manifest (sha256 differs)" in capsys.readouterr().err
    with data.open("ab") as handle:  # a changed size is refused at load
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="expected .* bytes, found"):
        read_manifest(large_artifact, ("export",))


def test_removing_the_quick_checks_falls_back_to_the_full_hash(large_artifact):
    path = large_artifact / io.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest["file_checks"]
    path.write_text(json.dumps(manifest))
    _flip(large_artifact / io.WEIGHTS_FILE, _unsampled_offset(large_artifact / io.WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        read_manifest(large_artifact, ("export",))


def test_open_checkpoint_reads_headers_only(tmp_path):
    ckpt = write_variant("gelu_parallel", tmp_path / "ckpt", fmt="sharded", dtype="bf16")
    weights = open_checkpoint(ckpt, VARIANTS["gelu_parallel"])
    w = weights["layers.0.qkv.weight"]
    assert w.shape == (192, 64) and w.T.shape == (64, 192) and w.T.astype(np.float16).nbytes == 192 * 64 * 2
    want = random_model(VARIANTS["gelu_parallel"]).state_dict()["layers.0.qkv.weight"].to(torch.bfloat16).float().numpy()
    assert np.array_equal(w.T.numpy(), want.T)
    blocks = list(w.T.blocks(block_bytes=4096))  # small blocks: the same bytes in order
    assert len(blocks) > 1 and np.array_equal(np.concatenate(blocks), want.T)


def test_take_rows_permutes_the_source_rows_block_by_block(tmp_path):
    from neoxrt.export.neox_onnx import packed_order

    ckpt = write_variant("gelu_parallel", tmp_path / "ckpt", fmt="sharded", dtype="bf16")
    weights = open_checkpoint(ckpt, VARIANTS["gelu_parallel"])
    state = random_model(VARIANTS["gelu_parallel"]).state_dict()
    order = packed_order(VARIANTS["gelu_parallel"].num_heads, VARIANTS["gelu_parallel"].head_dim)
    want = state["layers.0.qkv.weight"].to(torch.bfloat16).float().numpy()[order]
    w = weights["layers.0.qkv.weight"].take_rows(order).T
    blocks = list(w.blocks(block_bytes=4096))
    assert len(blocks) > 1 and np.array_equal(np.concatenate(blocks), want.T)
    assert np.array_equal(w.astype(np.float16).numpy(), want.T.astype(np.float16))
    bias = weights["layers.0.qkv.bias"].take_rows(order)
    assert np.array_equal(bias.numpy(), state["layers.0.qkv.bias"].to(torch.bfloat16).float().numpy()[order])
    with pytest.raises(ValueError, match="permutation"):
        weights["layers.0.qkv.weight"].take_rows(order[:-1])
