"""`NeoXConfig`: the one typed, frozen description of a GPT-NeoX that every stage reads."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from neoxrt.errors import CheckpointError

# Activations GPT-NeoX checkpoints use, as Hugging Face spells them.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")
ROPE_TYPES = ("default", "linear")

# What we support, field by field; every value must be covered by a test variant (tests/model).
SUPPORT_TABLE = {
    "hidden_act": ACTIVATIONS,
    "rope_type": ROPE_TYPES,
    "use_parallel_residual": (True, False),
    "attention_bias": (True, False),
    "tie_word_embeddings": (True, False),
    "partial_rotary": (True, False),
    "head_dim_power_of_two": (True, False),
}


def support_key(config: NeoXConfig) -> dict:
    """The SUPPORT_TABLE values that `config` exercises."""
    return {
        "hidden_act": config.hidden_act,
        "rope_type": config.rope_type,
        "use_parallel_residual": config.use_parallel_residual,
        "attention_bias": config.attention_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "partial_rotary": config.rotary_dim < config.head_dim,
        "head_dim_power_of_two": config.head_dim & (config.head_dim - 1) == 0,
    }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite int or float (JSON's NaN and Infinity, bools and strings are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class NeoXConfig:
    """Shape and numerics of a GPT-NeoX.

    Derived fields (`head_dim`, `rotary_dim`) are computed once in `__post_init__`.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    head_dim: int = dataclasses.field(init=False)
    rotary_dim: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise CheckpointError(f"config: {name} must be a positive integer, found {value!r}")
        if self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"config: hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_heads})"
            )
        for name in ("use_parallel_residual", "attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise CheckpointError(f"config: {name} must be true or false, found {getattr(self, name)!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(
                f"config: hidden_act {self.hidden_act!r} is not supported; expected one of {', '.join(ACTIVATIONS)}"
            )
        if not isinstance(self.rope_type, str) or self.rope_type not in ROPE_TYPES:
            raise CheckpointError(
                f"config: rope type {self.rope_type!r} is not supported; expected one of {', '.join(ROPE_TYPES)}"
            )
        # rope base and factor >= 1 (transformers' rule for the factor): below 1 the rotation frequencies pass
        # 1 rad/position, no GPT-NeoX has that, and tiny values overflow float32 into NaN logits (found by fuzzing)
        for name, low, what in (("layer_norm_eps", 0.0, "layer_norm_eps must be a finite number > 0"),
                                ("rotary_base", 1.0, "rope base (rotary_emb_base / rope_theta) must be a finite number >= 1"),
                                ("rotary_pct", 0.0, "rotary_pct must be in (0, 1]"),
                                ("rope_factor", 1.0, "rope scaling factor must be a finite number >= 1")):
            value = getattr(self, name)
            if not _is_real(value) or (value < low if low else value <= 0) or (name == "rotary_pct" and value > 1.0):
                raise CheckpointError(f"config: {what}, found {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value < self.vocab_size):
                raise CheckpointError(f"config: {name} must be a token id in [0, {self.vocab_size}) or null, found {value!r}")
        head_dim = self.hidden_size // self.num_heads
        rotary_dim = int(head_dim * self.rotary_pct)  # as transformers computes it
        if rotary_dim < 2 or rotary_dim % 2:
            raise CheckpointError(
                f"config: rotary dimension int({head_dim} * {self.rotary_pct}) = {rotary_dim} must be even and >= 2"
            )
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "rotary_dim", rotary_dim)

    def to_dict(self) -> dict:
        """The init fields, JSON-ready (derived fields are left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict) -> NeoXConfig:
        """Inverse of `to_dict` (used for manifests)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"NeoXConfig: expected an object, found {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.init and f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise CheckpointError(f"NeoXConfig: missing fields {missing}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"NeoXConfig: unknown fields {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
