"""Fuzz (hypothesis): any value in any config.json field gives a config the model builds and runs with finite
logits, or one CheckpointError line naming the field -- never another exception."""

import json
import math

import torch
from fuzzing import budget, fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from neox_testing import VARIANTS
from neoxrt.errors import CheckpointError
from neoxrt.model import NeoX, config_from_hf, config_to_hf

BASE = config_to_hf(VARIANTS["gelu_parallel"])
# config.json key -> the other names a message may use for it
NAMES = {"num_hidden_layers": ("num_layers",), "num_attention_heads": ("num_heads", "num_attention_heads"),
         "rotary_pct": ("rotary_pct", "rotary dimension", "rotary fraction"), "rotary_emb_base": ("rope base",),
         "rope_scaling": ("rope_scaling", "rope type", "rope factor", "rope scaling factor"),
         "hidden_size": ("hidden_size", "rotary dimension"),
         "vocab_size": ("vocab_size", "token id")}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["", "tiny", "gelu", "linear", "1e-5", "false"]), st.lists(st.integers(-1, 200), max_size=2),
                   st.fixed_dictionaries({"type": st.sampled_from(["linear", "dynamic", 3]), "factor": st.floats()}))


@fuzz
@budget(60)
@given(key=st.sampled_from(sorted(BASE)), value=VALUES)
def test_any_config_value_is_accepted_and_runs_or_named(key, value):
    data = {**BASE, key: value}
    try:
        config = config_from_hf(json.loads(json.dumps(data)))
    except CheckpointError as exc:
        event("refused")
        message = str(exc)
        assert "\n" not in message
        assert any(name in message for name in (key, *NAMES.get(key, ()))), (key, value, message)
        return
    event("accepted")
    assert 0 < config.rotary_pct <= 1 and config.layer_norm_eps > 0 and config.max_position_embeddings >= 1
    assert math.isfinite(config.rotary_base) and config.rotary_base > 0
    assert all(isinstance(getattr(config, f), bool) for f in ("use_parallel_residual", "attention_bias", "tie_word_embeddings"))
    torch.manual_seed(0)
    model = NeoX(config).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits, _ = model(ids, torch.arange(3)[None], torch.ones_like(ids), model.empty_past(1))
    assert torch.isfinite(logits).all()
