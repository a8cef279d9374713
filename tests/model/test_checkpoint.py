"""Checkpoint formats and dtypes load to the same model; bad checkpoints raise one CheckpointError."""

import json
import shutil

import pytest
import torch

from neox_testing import FORMAT_CASES, write_variant
from neoxrt.cli import main
from neoxrt.errors import CheckpointError
from neoxrt.model import load_model, random_model, read_config
from neoxrt.model.checkpoint import DTYPES


@pytest.mark.parametrize("fmt,dtype", FORMAT_CASES)
def test_formats_and_dtypes_load(fmt, dtype, tmp_path):
    folder = write_variant("gelu_parallel", tmp_path / "ckpt", fmt=fmt, dtype=dtype)
    model = load_model(folder)
    reference = random_model(model.config, seed=0)
    for (name, got), (_, want) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert got.dtype == torch.float32
        assert torch.equal(got, want.to(DTYPES[dtype]).float()), name


def test_tied_checkpoint_has_no_embed_out(tmp_path):
    folder = write_variant("tied_embeddings", tmp_path / "tied")
    model = load_model(folder)
    assert model.lm_head.weight is model.embed.weight
    assert model.num_parameters() == sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")


def test_parameter_count_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from neox_testing import default_checkpoint

    hf = transformers.GPTNeoXForCausalLM.from_pretrained(default_checkpoint())
    assert load_model(default_checkpoint()).num_parameters() == sum(p.numel() for p in hf.parameters())


def _corrupt_cases(tmp_path):
    """name -> (folder, fragment the message must contain)."""
    good = write_variant("gelu_parallel", tmp_path / "good")
    cases = {"missing folder": (tmp_path / "nope", "does not exist")}

    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return edit(folder)

    def bad_json(folder):
        (folder / "config.json").write_text("{not json")
        return folder

    def not_neox(folder):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
        return folder

    def truncated(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        return folder

    def missing_tensor(folder):
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        del state["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
        save_file(state, str(folder / "model.safetensors"))
        return folder

    def misshaped(folder):
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        state["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(64, 32)
        save_file(state, str(folder / "model.safetensors"))
        return folder

    def bad_act(folder):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "swiglu"}))
        return folder

    def no_key(folder):
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["hidden_size"]
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    def no_weights(folder):
        (folder / "model.safetensors").unlink()
        return folder

    cases["malformed config"] = (variant("bad_json", bad_json), "not valid JSON")
    cases["not neox"] = (variant("llama", not_neox), "model_type must be 'gpt_neox', found 'llama'")
    cases["truncated safetensors"] = (variant("trunc", truncated), "model.safetensors is truncated: ")
    cases["missing tensor"] = (variant("missing", missing_tensor), "missing tensors: gpt_neox.layers.1.mlp.dense_4h_to_h.weight")
    cases["mis-shaped tensor"] = (
        variant("shape", misshaped),
        "gpt_neox.layers.0.attention.dense.weight expected [64, 64] found [64, 32]",
    )
    cases["unsupported activation"] = (variant("act", bad_act), "hidden_act 'swiglu' is not supported")
    cases["missing key"] = (variant("nokey", no_key), "looked for hidden_size")
    cases["no weights"] = (variant("noweights", no_weights), "no weights in")
    return cases


def test_bad_checkpoints_raise_one_line_errors(tmp_path, capsys):
    for name, (folder, fragment) in _corrupt_cases(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_model(folder)
        message = str(info.value)
        assert fragment in message, (name, message)
        assert "\n" not in message, name
        assert main(["inspect", str(folder)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, (name, err)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not be downloaded|not installed"):
        load_model("EleutherAI/pythia-14m-does-not-exist")


def test_inspect_prints_config_and_exact_parameter_count(capsys):
    from neox_testing import default_checkpoint

    assert main(["inspect", str(default_checkpoint())]) == 0
    out = capsys.readouterr().out
    assert '"num_layers": 6' in out
    assert out.strip().splitlines()[-1] == "parameters: 14067712"
    assert read_config(default_checkpoint()).rotary_dim == 8
