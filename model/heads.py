"""The other GPT-NeoX heads in PyTorch, over the same trunk as `neoxrt.model.neox`: sequence classification
(`score`), token classification (`classifier`), question answering (`qa_outputs`) and the bare trunk (feature
extraction). No KV cache: one forward pass over the whole text.

    (input_ids [B,S], attention_mask [B,S]) -> positions = real tokens counted (cumsum(mask) - 1)
        -> trunk -> x [B,S,Hd] -> ln_f ->  text-classification:  score(x at the last real token) [B,L]
                                            token-classification: classifier(x) [B,S,L]
                                            question-answering:   qa_outputs(x) -> start, end [B,S]
                                            feature-extraction:   x [B,S,Hd]

Padding-invariant: a row's outputs do not depend on how it was padded (left or right), because positions
count real tokens and the sequence head pools the last real token (transformers pools the last token that is
not `pad_token_id`, and numbers positions 0..S-1 whatever the padding; for one unpadded row both agree).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from neoxrt import contract as io
from neoxrt.errors import CheckpointError
from neoxrt.model.config import NeoXConfig
from neoxrt.model.hf_names import head_from_hf
from neoxrt.model.neox import Block, attention_allowed, rope_cos_sin, rope_inv_freq
from neoxrt.model.task import HEAD_LAYERS, HeadConfig


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, S] rotary positions counting real tokens only (padding gets 0; it is never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_real_token(attention_mask: Tensor) -> Tensor:
    """[B] index of each row's last real token (left or right padding)."""
    index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (index[None, :] * attention_mask.long()).argmax(-1)


class NeoXHead(nn.Module):
    """A GPT-NeoX trunk with one of the non-generating heads (`head.task` in `contract.HEAD_TASKS`)."""

    def __init__(self, config: NeoXConfig, head: HeadConfig):
        super().__init__()
        if head.task not in io.HEAD_TASKS:
            raise CheckpointError(f"NeoXHead: task must be one of {', '.join(io.HEAD_TASKS)}, got {head.task!r}")
        self.config, self.head = config, head
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if head.task in HEAD_LAYERS:
            name, bias = HEAD_LAYERS[head.task]
            setattr(self, name, nn.Linear(config.hidden_size, head.output_width(), bias=bias))  # transformers' name
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def trunk(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Final hidden states [B, S, Hd] (after ln_f), positions counting real tokens."""
        cfg = self.config
        x = self.embed(input_ids)  # [B, S, Hd]
        cos, sin = rope_cos_sin(self.inv_freq, positions_from_mask(attention_mask))  # [B, S, R]
        allowed = attention_allowed(attention_mask, input_ids.shape[1])  # [B, 1, S, S]
        empty = x.new_zeros((x.shape[0], cfg.num_heads, 0, cfg.head_dim))
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, allowed, empty, empty)
        return self.ln_f(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Args:
            input_ids: [B, S] token ids.
            attention_mask: [B, S], 1 for real tokens, 0 for padding (left or right).

        Returns:
            {output name: tensor} under the contract's names (`contract.head_io_spec`).
        """
        x = self.trunk(input_ids, attention_mask)  # [B, S, Hd]
        task = self.head.task
        if task == io.TEXT_CLASSIFICATION:
            pooled = x[torch.arange(x.shape[0]), last_real_token(attention_mask)]  # [B, Hd]
            return {io.LOGITS: self.score(pooled)}  # [B, L]
        if task == io.TOKEN_CLASSIFICATION:
            return {io.LOGITS: self.classifier(x)}  # [B, S, L]
        if task == io.QUESTION_ANSWERING:
            logits = self.qa_outputs(x)  # [B, S, 2]
            return {io.START_LOGITS: logits[..., 0], io.END_LOGITS: logits[..., 1]}
        return {io.LAST_HIDDEN_STATE: x}


def read_head(folder: Path, task: str | None = None) -> HeadConfig:
    """The head `folder/config.json` describes (`task` overrides its architectures)."""
    path = Path(folder) / io.CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"config.json: expected a JSON object, found {type(data).__name__}")
    return head_from_hf(data, task)


def load_head_model(source, task: str | None = None, dtype: torch.dtype = torch.float32) -> NeoXHead:
    """A head checkpoint (any format `load_model` reads) as a `NeoXHead`, the PyTorch reference of head exports.

    Raises:
        CheckpointError: see `neoxrt.model.weights.open_checkpoint`; or the task is the causal LM.
    """
    from neoxrt.model.checkpoint import read_config, resolve_checkpoint
    from neoxrt.model.weights import open_checkpoint

    folder = resolve_checkpoint(source)
    config, head = read_config(folder), read_head(folder, task)
    with torch.device("meta"):
        model = NeoXHead(config, head)
    state = {k: torch.from_numpy(np.ascontiguousarray(v.numpy())).to(dtype)
             for k, v in open_checkpoint(folder, config, head).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config)
    return model.eval()
