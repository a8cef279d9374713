"""GPT-NeoX in PyTorch with explicit KV-cache I/O, and Hugging Face checkpoint loading."""

from neoxrt.model.checkpoint import (
    checkpoint_hash,
    load_model,
    random_model,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)
from neoxrt.model.config import ACTIVATIONS, NeoXConfig
from neoxrt.model.hf_names import config_from_hf, config_to_hf
from neoxrt.model.neox import NeoX

__all__ = [
    "ACTIVATIONS",
    "NeoX",
    "NeoXConfig",
    "checkpoint_hash",
    "config_from_hf",
    "config_to_hf",
    "load_model",
    "random_model",
    "read_config",
    "resolve_checkpoint",
    "save_checkpoint",
]
