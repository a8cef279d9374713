"""Checkpoints written the way EleutherAI published Pythia and GPT-NeoX-20B, for every test of checkpoint loading.

    write_published(model, folder, fmt="sharded" | "sharded-bin", dtype="fp16", shards=3)
        sharded safetensors (model-0000N-of-0000M.safetensors + model.safetensors.index.json) or sharded .bin
        (pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json, the 2022 conversion), with the three
        old buffers in every layer (attention.bias: a bool causal mask [1, 1, P, P]; attention.masked_bias;
        attention.rotary_emb.inv_freq), each listed in the index, whose metadata holds only total_size;
        `misplaced`: some buffers' index entries name a shard that does not hold them (seen in real
        conversions); `companions`: the tokenizer, tokenizer_config.json and generation_config.json of the
        folder given, as a published folder has them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from neoxrt.model import save_checkpoint

PUBLISHED_FORMATS = ("sharded", "sharded-bin")
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def index_path(folder: Path) -> Path:
    return next(p for p in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json")
                if p.is_file())


def write_published(model, folder: Path, fmt: str = "sharded", dtype: str = "fp16", shards: int = 3,
                    misplaced: bool = True, companions: Path | None = None) -> Path:
    save_checkpoint(model, folder, fmt=fmt, dtype=dtype, shards=shards, buffers=True)
    index = json.loads(index_path(folder).read_text())
    assert set(index["metadata"]) == {"total_size"}
    if misplaced:  # every layer's inv_freq listed under the first shard, whichever holds it
        first = sorted(set(index["weight_map"].values()))[0]
        for name in index["weight_map"]:
            if name.endswith("rotary_emb.inv_freq"):
                index["weight_map"][name] = first
        index_path(folder).write_text(json.dumps(index, indent=2))
    for name in COMPANIONS if companions else ():
        if (companions / name).is_file():
            shutil.copyfile(companions / name, folder / name)
    return folder
