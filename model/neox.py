"""GPT-NeoX in PyTorch, written for export: explicit KV-cache inputs and outputs, no Python branching on
tensor values, past length 0 allowed for the prompt step.

    (input_ids [B,S], position_ids [B,S], attention_mask [B,P+S], past keys/values per layer [B,H,P,D])
        -> (logits [B,S,V], presents: per layer (key, value) [B,H,P+S,D])

Numerically it follows transformers' `GPTNeoXForCausalLM` (eager attention): rotary on the first
`rotary_dim` channels of each head (rotate-half layout), softmax in fp32, parallel or sequential residual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neoxrt.model.config import NeoXConfig


def activation(name: str, x: Tensor) -> Tensor:
    """The MLP activation, as transformers defines each name."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu_new":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if name == "gelu_fast":
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")  # NeoXConfig has already refused it


def rope_inv_freq(config: NeoXConfig) -> Tensor:
    """Inverse frequencies [R/2] in fp32, computed as transformers does (default and linear scaling)."""
    dim = config.rotary_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rotary_base**exponent)
    return inv_freq / config.rope_factor


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin [B, S, R] for integer positions [B, S], in fp32."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # [B, S, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, R]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first R channels of x [B, H, S, D]; cos/sin are [B, S, R]."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [B, 1, S, R]
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def attention_allowed(attention_mask: Tensor, seq_len: int) -> Tensor:
    """Boolean [B, 1, S, T]: query i (absolute position T-S+i) may see key j when j <= T-S+i and
    attention_mask[b, j] is 1. T = attention_mask.shape[1] = past + sequence."""
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)  # [T]
    query_pos = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)  # [S]
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, T]
    return causal[None, None] & attention_mask[:, None, None, :].bool()  # [B, 1, S, T]


class Block(nn.Module):
    """One GPT-NeoX layer: attention with rotary and KV cache, MLP, parallel or sequential residual."""

    def __init__(self, config: NeoXConfig):
        super().__init__()
        h, bias = config.hidden_size, config.attention_bias
        self.config = config
        self.ln_attn = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ln_mlp = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(h, 3 * h, bias=bias)
        self.attn_out = nn.Linear(h, h, bias=bias)
        self.mlp_in = nn.Linear(h, config.intermediate_size)
        self.mlp_out = nn.Linear(config.intermediate_size, h)

    def attention(
        self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.config
        b, s, _ = x.shape
        # transformers' fused layout: per head [q | k | v], each head_dim wide
        qkv = self.qkv(x).view(b, s, cfg.num_heads, 3 * cfg.head_dim).transpose(1, 2)  # [B, H, S, 3D]
        q, k, v = qkv.split(cfg.head_dim, dim=-1)  # [B, H, S, D] each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat((past_k.to(k.dtype), k), dim=2)  # [B, H, T, D]
        v = torch.cat((past_v.to(v.dtype), v), dim=2)  # [B, H, T, D]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * cfg.head_dim**-0.5  # [B, H, S, T]
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, cfg.hidden_size)  # [B, S, H*D]
        return self.attn_out(out), k, v

    def mlp(self, x: Tensor) -> Tensor:
        return self.mlp_out(activation(self.config.hidden_act, self.mlp_in(x)))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        attn, k, v = self.attention(self.ln_attn(x), cos, sin, allowed, past_k, past_v)
        if self.config.use_parallel_residual:
            x = x + attn + self.mlp(self.ln_mlp(x))
        else:
            x = x + attn
            x = x + self.mlp(self.ln_mlp(x))
        return x, k, v


class NeoX(nn.Module):
    """GPT-NeoX causal LM with explicit KV cache."""

    def __init__(self, config: NeoXConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def num_parameters(self) -> int:
        """Exact parameter count, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[tuple[Tensor, Tensor]]:
        """Zero-length KV cache for the prompt step."""
        cfg = self.config
        dtype = dtype or self.embed.weight.dtype
        shape = (batch, cfg.num_heads, 0, cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(cfg.num_layers)]

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor,
        past: list[tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """One step (prompt or decode).

        Args:
            input_ids: [B, S] token ids.
            position_ids: [B, S] rotary positions (left-padded rows start later).
            attention_mask: [B, P+S], 1 for real tokens, 0 for padding (past and current).
            past: per layer (key, value) [B, H, P, D]; P may be 0.

        Returns:
            (logits [B, S, V], presents: per layer (key, value) [B, H, P+S, D]).
        """
        x = self.embed(input_ids)  # [B, S, Hd]
        cos, sin = rope_cos_sin(self.inv_freq, position_ids)  # [B, S, R]
        allowed = attention_allowed(attention_mask, input_ids.shape[1])  # [B, 1, S, T]
        presents = []
        for layer, (past_k, past_v) in zip(self.layers, past):
            x, k, v = layer(x, cos, sin, allowed, past_k, past_v)
            presents.append((k, v))
        logits = self.lm_head(self.ln_f(x))  # [B, S, V]
        return logits, presents
