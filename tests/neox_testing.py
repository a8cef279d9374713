"""Shared test helpers: tiny configs that span every supported variant, reference models, greedy loops."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from neoxrt.assets import DEFAULT_MODEL_DIR
from neoxrt.model import NeoXConfig, random_model, save_checkpoint

BASE = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
            max_position_embeddings=256)

# Every supported config variant has a tiny config here; tests/model/test_support_table.py checks that
# the variants below cover the support table in neoxrt.model.config.
VARIANTS: dict[str, NeoXConfig] = {
    "gelu_parallel": NeoXConfig(**BASE),
    "sequential_residual": NeoXConfig(**BASE, use_parallel_residual=False),
    "gelu_new": NeoXConfig(**BASE, hidden_act="gelu_new"),
    "gelu_fast": NeoXConfig(**BASE, hidden_act="gelu_fast"),
    "gelu_pytorch_tanh": NeoXConfig(**BASE, hidden_act="gelu_pytorch_tanh", use_parallel_residual=False),
    "relu": NeoXConfig(**BASE, hidden_act="relu"),
    "silu": NeoXConfig(**BASE, hidden_act="silu"),
    "no_attention_bias": NeoXConfig(**BASE, attention_bias=False),
    "tied_embeddings": NeoXConfig(**BASE, tie_word_embeddings=True),
    "head_dim_80": NeoXConfig(**{**BASE, "hidden_size": 160, "num_heads": 2}),  # Pythia-2.8b head size
    "head_dim_96_rotary_24": NeoXConfig(**{**BASE, "hidden_size": 192, "num_heads": 2}),  # NeoX-20B heads
    "full_rotary_eps": NeoXConfig(**BASE, rotary_pct=1.0, layer_norm_eps=1e-3, rotary_base=500.0),
    "linear_rope_scaling": NeoXConfig(**BASE, rope_type="linear", rope_factor=2.0),
}

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 3], [64, 65, 66, 67]]


def default_checkpoint() -> Path:
    return DEFAULT_MODEL_DIR


def write_variant(name: str, folder: Path, fmt: str = "safetensors", dtype: str = "fp32", seed: int = 0) -> Path:
    """A random checkpoint of VARIANTS[name] on disk."""
    return save_checkpoint(random_model(VARIANTS[name], seed=seed), folder, fmt=fmt, dtype=dtype)


def left_pad(prompts: list[list[int]], pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for a left-padded batch, positions as transformers makes them."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def with_fields(config: NeoXConfig, **changes) -> NeoXConfig:
    return dataclasses.replace(config, **changes)
