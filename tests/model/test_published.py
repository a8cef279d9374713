"""Checkpoints as EleutherAI published them (sharded safetensors and sharded .bin, the old buffers in every layer
and in the index, some index entries pointing at the wrong shard, metadata with only total_size, companions
beside the weights) export, inspect, calibrate and compare exactly as the same checkpoint without them."""

import json

import numpy as np
import pytest
import torch

from neox_testing import VARIANTS, default_checkpoint
from neoxrt import contract as io
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.manifest import read_manifest
from neoxrt.model import load_model, random_model, save_checkpoint
from neoxrt.runtime import Generator
from published import PUBLISHED_FORMATS, index_path, write_published

QUIET = dict(log=lambda *_: None)
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 3], [64, 65, 66, 67]]


def _weights_digests(artifact) -> dict:
    return {f: d for f, d in read_manifest(artifact, ("export", "calibrate"))["files"].items() if f.startswith(io.MODEL_FILE)}


def _hf_greedy(folder, prompts, new_tokens):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:  # one row at a time: no padding to reason about
            ids = torch.tensor([p])
            row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            eos = model.config.eos_token_id
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@pytest.mark.parametrize("fmt", PUBLISHED_FORMATS)
def test_published_layout_exports_and_calibrates_like_its_plain_twin(fmt, tmp_path):
    model = random_model(VARIANTS["gelu_parallel"], seed=4)
    published = write_published(model, tmp_path / "published", fmt=fmt, dtype="fp16")
    plain = save_checkpoint(model, tmp_path / "plain", fmt=fmt, dtype="fp16")
    index = json.loads(index_path(published).read_text())
    assert any(k.endswith("attention.bias") for k in index["weight_map"])  # the fixture is what it says
    assert main(["inspect", str(published)]) == 0
    for name, ckpt in (("published", published), ("plain", plain)):
        export_checkpoint(ckpt, tmp_path / f"{name}-fp32", ExportOptions(external_data_threshold=0), **QUIET)
        assert main(["calibrate", str(tmp_path / f"{name}-fp32"), str(tmp_path / f"{name}-int4"), "--weights-only",
                     "--bits", "4", "--method", "rtn"]) == 0
    for stage in ("fp32", "int4"):
        assert _weights_digests(tmp_path / f"published-{stage}") == _weights_digests(tmp_path / f"plain-{stage}")
    got = Generator.from_artifacts(tmp_path / "published-fp32").generate(PROMPTS, max_new_tokens=24).ids
    assert got == _hf_greedy(published, PROMPTS, 24)
    reference = load_model(published)
    for (name, a), (_, b) in zip(reference.state_dict().items(), load_model(plain).state_dict().items()):
        assert torch.equal(a, b), name


def test_published_trained_model_end_to_end(tmp_path):
    """The embedded trained model rewritten as Pythia's folders are (fp16 .bin shards of the 2022 conversion, its
    tokenizer, tokenizer_config.json and generation_config.json beside them): export, the default INT4 (awq), and
    compare against the published folder."""
    folder = write_published(load_model(default_checkpoint()), tmp_path / "pythia", fmt="sharded-bin", dtype="fp16",
                             companions=default_checkpoint())
    art = tmp_path / "art"
    assert main(["export", str(folder), str(art)]) == 0
    assert (art / io.GENERATION_CONFIG_FILE).is_file()
    generator = Generator.from_artifacts(art)
    prompts = [generator.tokenizer.encode(t).ids for t in ("The state of the Union is", "We")]
    assert generator.generate(prompts, max_new_tokens=32).ids == _hf_greedy(folder, prompts, 32)
    assert main(["calibrate", str(art), str(tmp_path / "int4"), "--weights-only", "--bits", "4"]) == 0
    assert main(["compare", str(tmp_path / "int4"), "--reference", str(folder), "--windows", "2"]) == 0


def test_index_without_metadata_loads(tmp_path):
    folder = write_published(random_model(VARIANTS["gelu_parallel"]), tmp_path / "ckpt", misplaced=False)
    index = json.loads(index_path(folder).read_text())
    index_path(folder).write_text(json.dumps({"weight_map": index["weight_map"]}))
    assert main(["export", str(folder), str(tmp_path / "art")]) == 0


def test_a_weight_no_shard_holds_is_still_named(tmp_path, capsys):
    folder = write_published(random_model(VARIANTS["gelu_parallel"]), tmp_path / "ckpt")
    index = json.loads(index_path(folder).read_text())
    index["weight_map"]["gpt_neox.layers.1.attention.dense.weight"] = index["weight_map"]["gpt_neox.layers.0.attention.bias"]
    shard = folder / index["weight_map"]["gpt_neox.layers.1.attention.dense.weight"]
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):  # take the weight out of whichever shard holds it
        state = load_file(str(path))
        if state.pop("gpt_neox.layers.1.attention.dense.weight", None) is not None:
            save_file(state, str(path))
    assert shard.is_file()
    index_path(folder).write_text(json.dumps(index))
    assert main(["export", str(folder), str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names tensors no shard has: gpt_neox.layers.1.attention.dense.weight" in err, err


@pytest.mark.parametrize("config_layers,message", [(5, "config.json: num_hidden_layers 5; the checkpoint holds layers 0\u20131"),
                                                   (1, "config.json: num_hidden_layers 1; the checkpoint holds layers 0\u20131")])
def test_layer_count_mismatch_in_one_line(config_layers, message, tmp_path, capsys):
    folder = write_published(random_model(VARIANTS["gelu_parallel"]), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config_layers}))
    for command in (["export", str(folder), str(tmp_path / "art")], ["inspect", str(folder)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "art").exists()


def test_vocab_and_merges_without_tokenizer_json_refused_in_one_line(tmp_path, capsys):
    folder = write_published(random_model(VARIANTS["gelu_parallel"]), tmp_path / "ckpt")
    (folder / "vocab.json").write_text(json.dumps({"a": 0}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    assert main(["export", str(folder), str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab.json and merges.txt but no tokenizer.json" in err, err
    assert not (tmp_path / "art").exists()


def test_buffers_hold_what_transformers_saved(tmp_path):
    """The fixture's buffers are transformers 4.2x's: a bool lower-triangular mask over max positions, the rotary
    inverse frequencies, in the checkpoint's float type."""
    from safetensors import safe_open

    config = VARIANTS["gelu_parallel"]
    folder = write_published(random_model(config), tmp_path / "ckpt", misplaced=False)
    index = json.loads(index_path(folder).read_text())
    name = "gpt_neox.layers.1.attention.bias"
    with safe_open(str(folder / index["weight_map"][name]), "pt") as f:
        mask = f.get_tensor(name)
    p = config.max_position_embeddings
    assert mask.dtype == torch.bool and mask.shape == (1, 1, p, p)
    assert np.array_equal(mask[0, 0].numpy(), np.tril(np.ones((p, p), bool)))
