"""fp32 parity with transformers.GPTNeoXForCausalLM: prompt step, 16 decode steps through our own KV
cache, left-padded batch of 3, and 32 greedy tokens, on the trained default model and every variant."""

import pytest
import torch

from neox_testing import PROMPTS, VARIANTS, default_checkpoint, greedy, left_pad, write_variant
from neoxrt.model import load_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
DECODE_STEPS = 16
GREEDY_TOKENS = 32


def _hf(folder):
    model = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _checkpoint(name, tmp_path):
    if name == "trained_default":
        return default_checkpoint()
    return write_variant(name, tmp_path / name)


CASES = ["trained_default", *VARIANTS]


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_prompt_and_decode_logits_match(name, tmp_path):
    folder = _checkpoint(name, tmp_path)
    ours, ref = load_model(folder), _hf(folder)
    ids, mask, pos = left_pad(PROMPTS)
    logits, past = ours(ids, pos, mask, ours.empty_past(len(PROMPTS)))
    out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    valid = mask.bool()
    assert (logits - out.logits)[valid].abs().max().item() <= ATOL
    ref_past = out.past_key_values
    next_ids = logits[:, -1].argmax(-1, keepdim=True)
    for step in range(DECODE_STEPS):
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        pos = pos[:, -1:] + 1
        logits, past = ours(next_ids, pos, mask, past)
        out = ref(input_ids=next_ids, attention_mask=mask, position_ids=pos, past_key_values=ref_past, use_cache=True)
        ref_past = out.past_key_values
        err = (logits - out.logits).abs().max().item()
        assert err <= ATOL, f"decode step {step}: max abs {err}"
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
    assert past[0][0].shape == (3, ours.config.num_heads, ids.shape[1] + DECODE_STEPS, ours.config.head_dim)


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_greedy_matches_generate(name, tmp_path):
    folder = _checkpoint(name, tmp_path)
    ours, ref = load_model(folder), _hf(folder)
    ids, mask, _ = left_pad(PROMPTS)
    expected = ref.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
        do_sample=False, pad_token_id=1,
    )[:, ids.shape[1]:]
    assert torch.equal(greedy(ours, PROMPTS, GREEDY_TOKENS), expected)
