"""Fuzz (hypothesis): one checkpoint tensor retyped, reshaped or given a hostile value (NaN, +-Inf, past
float16's range, subnormal, zero), in safetensors or PyTorch .bin, streamed as export streams it (fp32 or fp16).
The contract: every tensor streams finite, of its expected shape, holding the checkpoint's values cast -- or one
CheckpointError line naming the tensor (and the first bad index for a value) -- never another exception."""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzzing import budget, fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from neox_testing import write_variant
from neoxrt.errors import CheckpointError
from neoxrt.model import config_from_hf
from neoxrt.model.hf_names import our_key
from neoxrt.model.weights import expected_shapes, open_checkpoint

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.uint8, torch.bool]
VALUES = [float("nan"), float("inf"), -float("inf"), 1e5, -7e4, 3e38, 65504.0, 1e-45, 0.0, -2.5]
WIDTH = {"fp32": np.float32, "fp16": np.float16}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = write_variant("gelu_parallel", tmp_path_factory.mktemp("fuzz-ckpt") / "base")
    from safetensors.torch import load_file

    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


MUTATIONS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
    st.tuples(st.just("shape"), st.sampled_from(["drop", "add", "grow", "shrink", "scalar", "empty"])),
    st.tuples(st.just("value"), st.tuples(st.sampled_from(VALUES), st.floats(0, 1, exclude_max=True),
                                          st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))),
)


def _mutate(tensor: torch.Tensor, kind: str, how):
    if kind == "dtype":
        return tensor.to(how)
    if kind == "shape":
        if how == "scalar":
            return tensor.reshape(-1)[0].clone()
        if how == "empty":
            return torch.zeros((0, *tensor.shape[1:]))
        if how == "drop":
            return tensor.reshape(-1).clone() if tensor.dim() > 1 else tensor[:1].reshape(()).clone()
        if how == "add":
            return tensor[None].clone()
        grown = list(tensor.shape)
        grown[0] += 1 if how == "grow" else -1
        return torch.zeros(grown)
    value, where, dtype = how
    tensor = tensor.to(dtype).clone()
    flat = tensor.reshape(-1)
    flat[int(where * flat.numel())] = value
    return tensor


@fuzz
@budget(60)
@given(name=st.sampled_from([
    "gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.query_key_value.weight",
    "gpt_neox.layers.1.attention.dense.bias", "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
    "gpt_neox.final_layer_norm.weight", "embed_out.weight", "gpt_neox.layers.0.input_layernorm.bias"]),
    mutation=MUTATIONS, fmt=st.sampled_from(["safetensors", "bin"]), width=st.sampled_from(["fp32", "fp16"]))
def test_any_tensor_streams_finite_or_is_named(base, name, mutation, fmt, width):
    cfg, state = base
    kind, how = mutation
    state = {**state, name: _mutate(state[name], kind, how).contiguous()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(cfg))
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(folder / "model.safetensors"))
        else:
            torch.save(state, folder / "pytorch_model.bin")
        config = config_from_hf(cfg)
        try:
            lazy = open_checkpoint(folder, config)
            streamed = {key: np.concatenate([b.reshape(-1) for b in array.astype(WIDTH[width]).blocks()])
                        for key, array in lazy.items()}
        except CheckpointError as exc:
            event(f"refused: {kind}")
            message = str(exc)
            assert "\n" not in message and name in message, (kind, how, message)
            if kind == "value":
                assert "at index [" in message, message
            return
    event(f"accepted: {kind}")
    shapes = expected_shapes(config)
    for key, flat in streamed.items():
        assert flat.size == math.prod(shapes[key]) and np.isfinite(flat).all(), key
    source = state[name].float().numpy().reshape(-1)
    expected = source.astype(WIDTH[width])
    assert np.array_equal(streamed[our_key(name)], expected)
