"""Load Hugging Face GPT-NeoX checkpoints from a local folder (or the hub, when online) into `NeoX`,
and write checkpoints in the same formats (used for random benchmark shapes and tests)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import numpy as np
import torch

from neoxrt.errors import CheckpointError
from neoxrt.model.config import NeoXConfig
from neoxrt.model.hf_names import config_from_hf, config_to_hf, hf_key
from neoxrt.model.neox import NeoX, rope_inv_freq
from neoxrt.model.weights import open_checkpoint

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(source: str | Path) -> Path:
    """A local checkpoint folder for `source`: a folder path, or a hub id downloaded when online.

    Raises:
        CheckpointError: the folder does not exist and `source` cannot be fetched.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint: expected a folder, found a file: {path}")
    if not _HUB_ID.match(str(source)):
        raise CheckpointError(f"checkpoint: folder {path} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"checkpoint: {source!r} is not a local folder, and huggingface_hub is not installed to download it"
        ) from None
    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as exc:  # offline, unknown repo, auth: one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint: {source!r} is not a local folder and could not be downloaded ({first})") from None


def read_config(folder: Path) -> NeoXConfig:
    """Parse `folder/config.json` into a `NeoXConfig`."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {path} is not valid JSON ({exc})") from None
    return config_from_hf(data)


def weight_files(folder: Path) -> list[Path]:
    """The weight files that make up the checkpoint, in load order."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                try:
                    shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                    raise CheckpointError(f"checkpoint: {path} is not a valid shard index ({exc})") from None
                return [path] + [folder / s for s in shards]
            return [path]
    raise CheckpointError(f"checkpoint: no weights in {folder}; looked for {', '.join(WEIGHT_FILES)}")


def load_model(source: str | Path, dtype: torch.dtype = torch.float32) -> NeoX:
    """Load a GPT-NeoX checkpoint (safetensors, sharded safetensors, pytorch_model.bin; fp32/fp16/bf16) into
    memory (the PyTorch reference; the export streams instead: `neoxrt.model.weights.open_checkpoint`).

    Raises:
        CheckpointError: see `open_checkpoint`.
    """
    folder = resolve_checkpoint(source)
    config = read_config(folder)
    with torch.device("meta"):
        model = NeoX(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(v.numpy())).to(dtype)
             for k, v in open_checkpoint(folder, config).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config)  # the meta buffer, recomputed
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def checkpoint_hash(folder: Path, stop: threading.Event | None = None) -> str:
    """sha256 over config.json and the weight files (names and bytes), for manifests; streamed in 8 MiB
    reads, returning early (with a partial digest) once `stop` is set."""
    digest = hashlib.sha256()
    for path in [folder / "config.json", *weight_files(folder)]:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(8 << 20), b""):
                digest.update(chunk)
                if stop is not None and stop.is_set():
                    return digest.hexdigest()
    return digest.hexdigest()


def random_model(config: NeoXConfig, seed: int = 0) -> NeoX:
    """A seeded random model whose every weight (LayerNorm and biases too) is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    model = NeoX(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln_attn.weight") or name.endswith("ln_mlp.weight") or name == "ln_f.weight":
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


def old_buffers(config: NeoXConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The persistent buffers transformers saved in every layer of the published Pythia and NeoX-20B checkpoints
    (`attention.bias`: the causal mask, bool [1, 1, P, P]; `attention.masked_bias`: a scalar; `attention.
    rotary_emb.inv_freq`), in the checkpoint's float type as `model.half()` left them. The loaders drop them."""
    p = config.max_position_embeddings
    mask = torch.tril(torch.ones(p, p, dtype=torch.bool)).view(1, 1, p, p)
    inv_freq = rope_inv_freq(config).to(dtype)
    out = {}
    for i in range(config.num_layers):
        prefix = f"gpt_neox.layers.{i}.attention."
        out.update({prefix + "bias": mask.clone(), prefix + "masked_bias": torch.tensor(-1e9).to(dtype),
                    prefix + "rotary_emb.inv_freq": inv_freq.clone()})  # own copies: safetensors refuses shared ones
    return out


CHECKPOINT_FORMATS = ("safetensors", "sharded", "bin", "sharded-bin")


def save_checkpoint(model: NeoX, folder: Path, fmt: str = "safetensors", dtype: str = "fp32", shards: int = 2,
                    buffers: bool = False) -> Path:
    """Write `model` as a Hugging Face checkpoint: fmt is safetensors, sharded (safetensors shards and
    model.safetensors.index.json), bin, or sharded-bin (pytorch_model-*.bin and pytorch_model.bin.index.json);
    `buffers` adds the old buffers in every layer (`old_buffers`), as the published checkpoints carry them.
    Shard indexes hold `metadata.total_size`, as transformers writes it."""
    from safetensors.torch import save_file

    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"checkpoint: unknown format {fmt!r}; expected {', '.join(CHECKPOINT_FORMATS)}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    state = {hf_key(k): v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["embed_out.weight"]
    if buffers:
        state.update(old_buffers(model.config, DTYPES[dtype]))

    def write(part: dict, path: Path) -> None:
        if path.suffix == ".safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    if fmt in ("safetensors", "bin"):
        write(state, folder / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"))
        return folder
    stem, suffix = ("model", "safetensors") if fmt == "sharded" else ("pytorch_model", "bin")
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}"
        write({n: state[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return folder
