"""Greedy generation with the PyTorch model: the reference continuation for reports, the demo and tests."""

from __future__ import annotations

import torch

from neoxrt.model.neox import NeoX


@torch.no_grad()
def greedy(model: NeoX, prompts: list[list[int]], new_tokens: int, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of a left-padded batch through the explicit KV cache (no early stop)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits, past = model(ids, pos, mask, model.empty_past(len(prompts)))
    out = []
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        logits, past = model(nxt, pos, mask, past)
    return torch.cat(out, dim=1).tolist()
