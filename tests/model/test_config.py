"""config.json in the transformers-4 and transformers-5 spellings gives the same NeoXConfig."""

import pytest

from neoxrt.errors import CheckpointError
from neoxrt.model import config_from_hf

T4 = {
    "model_type": "gpt_neox", "vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44,
    "num_attention_heads": 64, "intermediate_size": 24576, "rotary_pct": 0.25, "rotary_emb_base": 10000,
    "rope_scaling": None, "layer_norm_eps": 1e-5, "use_parallel_residual": True, "hidden_act": "gelu_fast",
    "attention_bias": True, "tie_word_embeddings": False, "max_position_embeddings": 2048, "eos_token_id": 0,
}
T5 = {
    **{k: v for k, v in T4.items() if k not in ("rotary_pct", "rotary_emb_base", "rope_scaling")},
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
}


def test_neox20b_both_spellings():
    a, b = config_from_hf(T4), config_from_hf(T5)
    assert a == b
    assert (a.head_dim, a.rotary_dim) == (96, 24)


def test_linear_scaling_both_spellings():
    a = config_from_hf({**T4, "rope_scaling": {"type": "linear", "factor": 4.0}})
    b = config_from_hf({**T5, "rope_parameters": {**T5["rope_parameters"], "rope_type": "linear", "factor": 4.0}})
    assert a == b and a.rope_type == "linear" and a.rope_factor == 4.0


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
        ({"hidden_size": 100, "num_attention_heads": 3}, "multiple of"),
        ({"hidden_size": "big"}, "hidden_size must be a positive integer"),
        ({"model_type": None}, "model_type must be 'gpt_neox'"),
        ({"rotary_pct": 0.01}, "rotary dimension"),
    ],
)
def test_unsupported_configs_are_named(change, fragment):
    with pytest.raises(CheckpointError, match=fragment):
        config_from_hf({**T4, **change})
