"""Checkpoint tensors opened lazily: names, shapes and dtypes from the file headers, bytes read only when a
writer asks for them, one block at a time.

    open_checkpoint(folder) -> {our key: LazyArray}      (nothing read but headers and the shard index)
    array.T.astype(np.float16)                            (recorded, not computed)
    array.take_rows(order)                                (recorded: the source's rows in another order)
    for block in array.blocks(): file.write(block)        (reads a block, casts, checks finite, yields it)

Memory bound: one block of the output (`BLOCK_BYTES`, 64 MiB) plus the source rows or columns it is made
from; safetensors files are memory-mapped (file pages, reclaimable), zip-format `pytorch_model*.bin` files are
opened with `torch.load(mmap=True)`. Nothing here holds a whole tensor unless `numpy()` is called.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import CheckpointError
from neoxrt.model.config import NeoXConfig
from neoxrt.model.hf_names import TASK_ARCHITECTURES, hf_key, layer_index, our_key
from neoxrt.model.task import HEAD_LAYERS, HeadConfig

BLOCK_BYTES = 64 << 20
# safetensors dtype tags we accept (floats only); BF16 has no numpy dtype and is widened from its uint16 bits
SAFETENSORS_FLOATS = {"F32": np.dtype("float32"), "F16": np.dtype("float16"), "BF16": np.dtype("uint16"),
                      "F64": np.dtype("float64")}
_MAX_HEADER = 100 << 20
FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 -> float32 (exact: bf16 is the top half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class Source:
    """Where one checkpoint tensor's bytes are: a safetensors byte range, or a torch tensor from an mmap'd .bin."""

    hf_name: str
    path: Path
    shape: tuple[int, ...]
    bf16: bool = False
    dtype: np.dtype | None = None  # stored dtype (uint16 for bf16); safetensors only
    offset: int = 0  # absolute byte offset in the file; safetensors only
    torch_tensor: object = None  # .bin only

    def rows(self, start: int, stop: int, cols: slice = slice(None)) -> np.ndarray:
        """Rows [start, stop) (and columns `cols`) as a 2-D float32/float16/float64 array: a view of the file's
        mapping (pages are read when touched), or a converted copy for bf16."""
        if self.torch_tensor is not None:
            t = self.torch_tensor.reshape(self.shape[0] if self.shape else 1, -1)[start:stop, cols]
            return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
        row = math.prod(self.shape[1:])
        flat = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(max(self.shape[0], 1), row))
        view = flat[start:stop, cols]
        return bf16_to_f32(view) if self.bf16 else view


class LazyArray:
    """A checkpoint tensor with a recorded transpose (2-D), cast and order of the source's rows; enough of
    numpy's interface for the graph emitter (`shape`, `dtype`, `.T`, `.astype`), plus `blocks()` to stream it
    and `numpy()` to load it."""

    def __init__(self, source: Source, transposed: bool = False, dtype: np.dtype | None = None,
                 order: np.ndarray | None = None):
        self.source = source
        self.transposed = transposed
        self.order = order  # source row i of the result is source row order[i]; None: as stored
        self.dtype = np.dtype(dtype) if dtype is not None else (
            np.dtype("float32") if source.bf16 or source.dtype is None else source.dtype)
        self.shape = tuple(reversed(source.shape)) if transposed else tuple(source.shape)

    @property
    def T(self) -> LazyArray:  # noqa: N802 (numpy's name)
        if len(self.shape) != 2:
            raise ValueError(f"transpose of a {len(self.shape)}-D tensor")
        return LazyArray(self.source, not self.transposed, self.dtype, self.order)

    def astype(self, dtype) -> LazyArray:
        return LazyArray(self.source, self.transposed, dtype, self.order)

    def take_rows(self, order: np.ndarray) -> LazyArray:
        """The source's rows (its first axis) in `order` (a permutation), before any transpose."""
        if self.transposed or sorted(order) != list(range(self.source.shape[0])):
            raise ValueError("take_rows: a permutation of the untransposed source's rows")
        return LazyArray(self.source, False, self.dtype, np.asarray(order))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def blocks(self, block_bytes: int = BLOCK_BYTES):
        """Yield the tensor in C order as contiguous arrays of at most ~`block_bytes`, cast to `dtype`.

        Raises:
            CheckpointError: a value is NaN or infinite (naming the tensor and the first bad index).
        """
        if self.order is not None and not self.transposed:  # small in practice (a bias): read, check, permute
            yield self._permuted(self.source.rows(0, self.source.shape[0]))
            return
        rows = self.shape[0] if self.shape else 1
        row_bytes = max(1, self.nbytes // max(rows, 1))
        step = max(1, block_bytes // row_bytes)
        if self.transposed and self.dtype.itemsize < 4:
            step = max(step, 2048)  # column blocks of the source: at least a page of each source row
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if self.transposed:  # output rows [start, stop) are source columns [start, stop)
                src = self.source.rows(0, self.source.shape[0], slice(start, stop))
                self._check_finite(src, col_offset=start)
                yield transpose(src if self.order is None else src[self.order], self.dtype)
            else:
                src = self.source.rows(start, stop)
                self._check_finite(src, row_offset=start)
                yield np.ascontiguousarray(src.astype(self.dtype, copy=False)).reshape((stop - start, *self.shape[1:]))

    def _permuted(self, src: np.ndarray) -> np.ndarray:
        self._check_finite(src)
        return np.ascontiguousarray(src[self.order].astype(self.dtype, copy=False)).reshape(self.shape)

    def _check_finite(self, src: np.ndarray, row_offset: int = 0, col_offset: int = 0) -> None:
        """The fast test first (fp16: the largest magnitude bit pattern is below the exponent-all-ones one; 2.4x
        faster than a float sum), the index only when it fails. A cast to float16 from a wider type also refuses
        finite values past float16's range (they would become infinities in the artifact)."""
        limit = FP16_MAX if self.dtype == np.float16 and src.dtype != np.float16 else None
        if src.dtype == np.float16:
            if int(np.max(src.view(np.uint16) & np.uint16(0x7FFF))) < 0x7C00:
                return
        elif limit is not None:
            if src.size == 0 or np.max(np.abs(src)) <= limit:  # NaN compares False: found below
                return
        elif np.isfinite(src).all():
            return
        bad = ~np.isfinite(src) if limit is None else ~(np.abs(src) <= limit)
        r, c = (int(i[0]) for i in np.nonzero(bad))
        flat = (r + row_offset) * math.prod(self.source.shape[1:]) + c + col_offset
        index = list(map(int, np.unravel_index(flat, self.source.shape))) if self.source.shape else []
        value = src[r, c]
        if np.isfinite(value):
            raise CheckpointError(f"checkpoint: {self.source.hf_name} has a value past float16's range ({value} beyond "
                                  f"+-{FP16_MAX:g}) at index {index}; export it in fp32")
        raise CheckpointError(f"checkpoint: {self.source.hf_name} has a non-finite value ({value}) at index {index}")

    def numpy(self) -> np.ndarray:
        """The whole tensor in memory (small models and tests)."""
        parts = list(self.blocks())
        return np.concatenate(parts, axis=0) if len(parts) > 1 else np.array(parts[0])  # owned, writable

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


def transpose(src: np.ndarray, dtype: np.dtype, tile: int = 256) -> np.ndarray:
    """src.T cast to `dtype`, contiguous, copied in square tiles (measured 3x faster than numpy's own
    transposing copy for fp16 [6144, 5461]: the tiles stay in cache). A strided source (a column block of a
    mapped file) is first copied out whole: 2-3x faster than tiling over the mapping's long rows."""
    src = np.ascontiguousarray(src)
    out = np.empty((src.shape[1], src.shape[0]), dtype)
    for c in range(0, src.shape[1], tile):
        for r in range(0, src.shape[0], tile):
            out[c:c + tile, r:r + tile] = src[r:r + tile, c:c + tile].T
    return out


# -- opening checkpoints -----------------------------------------------------------------------------


def _safetensors_sources(path: Path) -> dict[str, Source]:
    """Parse a safetensors header; check every tensor's range lies inside the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint: weight file {path} not found")
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"checkpoint: {path} is not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"checkpoint: {path} is not a readable safetensors file (header of {length} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint: {path} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint: {path} is not a readable safetensors file (header is not an object)")
    base = 8 + length
    sources = {}
    for name, info in header.items():
        if name == "__metadata__" or our_key(name) == "":  # metadata; old buffers (bool masks too), ignored
            continue
        try:
            tag, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"checkpoint: {path}: malformed header entry for {name}") from None
        if tag not in SAFETENSORS_FLOATS:
            raise CheckpointError(f"checkpoint: {name} in {path.name} has dtype {tag}; expected a float tensor "
                                  f"({', '.join(SAFETENSORS_FLOATS)})")
        dtype = SAFETENSORS_FLOATS[tag]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"checkpoint: {path.name}: {name} {list(shape)} {tag} has {end - begin} bytes, "
                                  f"expected {math.prod(shape) * dtype.itemsize}")
        if base + end > size:
            raise CheckpointError(f"checkpoint: {path} is truncated: {name} ends at byte {base + end}, "
                                  f"the file has {size}")
        sources[name] = Source(name, path, shape, bf16=tag == "BF16", dtype=dtype, offset=base + begin)
    return sources


def _bin_sources(path: Path) -> dict[str, Source]:
    """A zip-format PyTorch file, memory-mapped (tensors are views of the mapping)."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint: weight file {path} not found")
    try:
        import zipfile

        # zip-format files are memory-mapped; legacy (pre-1.6) files cannot be, and are read whole
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for a bad pickle or zip
        raise CheckpointError(f"checkpoint: {path} is not a readable PyTorch weight file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint: {path} holds a {type(state).__name__}, expected a state dict")
    sources = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"checkpoint: {name} in {path.name} is a {type(tensor).__name__}, expected a tensor")
        if not tensor.is_floating_point():
            if our_key(name) == "":  # old buffers (attention.bias is a bool mask): ignored anyway
                continue
            raise CheckpointError(f"checkpoint: {name} in {path.name} has dtype {str(tensor.dtype).removeprefix('torch.')}"
                                  "; expected a float tensor")
        sources[name] = Source(name, path, tuple(tensor.shape), bf16=tensor.dtype == torch.bfloat16,
                               torch_tensor=tensor.contiguous())
    return sources


def _sharded_sources(index_path: Path, opener) -> dict[str, Source]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {index_path} is not a valid shard index ({exc})") from None
    sources: dict[str, Source] = {}
    for shard in sorted(set(weight_map.values())):
        sources.update(opener(index_path.parent / shard))
    # the old buffers (causal mask, masked_bias, inv_freq) are listed by published indexes, and the readers drop
    # them; some conversions even point them at a shard that does not hold them: only weights must be found
    absent = sorted(n for n in weight_map if n not in sources and our_key(n) != "")
    if absent:
        raise CheckpointError(f"checkpoint: {index_path.name} names tensors no shard has: {', '.join(absent[:5])}"
                              + (f" and {len(absent) - 5} more" if len(absent) > 5 else ""))
    return sources


def checkpoint_sources(folder: Path) -> dict[str, Source]:
    """Every tensor of a checkpoint folder by its Hugging Face name, headers read, data untouched."""
    from neoxrt.model.checkpoint import weight_files

    first = weight_files(folder)[0]
    if first.name == "model.safetensors":
        return _safetensors_sources(first)
    if first.name == "model.safetensors.index.json":
        return _sharded_sources(first, _safetensors_sources)
    if first.name == "pytorch_model.bin":
        return _bin_sources(first)
    return _sharded_sources(first, _bin_sources)


def head_shapes(config: NeoXConfig, head: HeadConfig) -> dict[str, tuple[int, ...]]:
    """Our keys and shapes of `head`'s output layer (none for feature extraction)."""
    if head.task == io.FEATURE_EXTRACTION:
        return {}
    name, bias = HEAD_LAYERS[head.task]
    width = config.vocab_size if head.task == io.TEXT_GENERATION else head.output_width()
    return {f"{name}.weight": (width, config.hidden_size), **({f"{name}.bias": (width,)} if bias else {})}


def expected_shapes(config: NeoXConfig, head: HeadConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes for `config` with `head` (default: the causal LM), as `NeoX` and
    `NeoXHead` declare them."""
    c, hd = config, config.hidden_size
    shapes = {"embed.weight": (c.vocab_size, hd), "ln_f.weight": (hd,), "ln_f.bias": (hd,),
              **head_shapes(config, head or HeadConfig())}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "ln_attn.weight": (hd,), p + "ln_attn.bias": (hd,), p + "ln_mlp.weight": (hd,),
                       p + "ln_mlp.bias": (hd,), p + "qkv.weight": (3 * hd, hd), p + "attn_out.weight": (hd, hd),
                       p + "mlp_in.weight": (c.intermediate_size, hd), p + "mlp_out.weight": (hd, c.intermediate_size),
                       p + "mlp_in.bias": (c.intermediate_size,), p + "mlp_out.bias": (hd,)})
        if c.attention_bias:
            shapes.update({p + "qkv.bias": (3 * hd,), p + "attn_out.bias": (hd,)})
    return shapes


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def match_names(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                tied: bool, ignored: frozenset = frozenset()) -> dict[str, str]:
    """Our key -> Hugging Face name for every expected tensor, checking names and shapes.

    Raises:
        CheckpointError: naming every missing, unexpected or mis-shaped tensor (Hugging Face names).
    """
    ours: dict[str, str] = {}
    unexpected = []
    for name in found:
        key = our_key(name)
        if key in ignored:
            continue
        if key is None or (key and key not in expected):
            unexpected.append(name)
        elif key:
            ours[key] = name
    if tied and "embed.weight" in ours and "lm_head.weight" in expected:
        ours["lm_head.weight"] = ours["embed.weight"]
    missing = [hf_key(k) for k in expected if k not in ours]
    misshaped = [f"{hf_key(k)} expected {_fmt(shape)} found {_fmt(found[ours[k]])}"
                 for k, shape in expected.items() if k in ours and tuple(found[ours[k]]) != tuple(shape)]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(sorted(unexpected)))
    if misshaped:
        problems.append("mis-shaped tensors: " + "; ".join(misshaped))
    if problems:
        raise CheckpointError("checkpoint: " + " | ".join(problems))
    return ours


def open_checkpoint(folder: Path, config: NeoXConfig, head: HeadConfig | None = None) -> dict[str, LazyArray]:
    """Our key -> `LazyArray` for every weight of `config` with `head` (default: the causal LM); only headers
    are read. Feature extraction reads the trunk of any checkpoint and leaves its head's weights alone.

    Raises:
        CheckpointError: a missing or truncated shard, an index naming a tensor no shard has, a non-float
            tensor, missing / unexpected / mis-shaped tensors, or no weights for `head`'s task.
    """
    head = head or HeadConfig()
    sources = checkpoint_sources(Path(folder))
    found = {n: s.shape for n, s in sources.items()}
    _check_depth(found, config)
    _check_head_present(found, config, head)
    ignored = frozenset(k for t in HEAD_LAYERS.values() for k in (f"{t[0]}.weight", f"{t[0]}.bias")) \
        if head.task == io.FEATURE_EXTRACTION else frozenset()
    names = match_names(found, expected_shapes(config, head), config.tie_word_embeddings, ignored)
    return {key: LazyArray(sources[name]) for key, name in names.items()}


def _check_depth(found: dict, config: NeoXConfig) -> None:
    """A config naming another number of layers than the checkpoint holds is said in one line (not as every
    tensor of the missing or extra layers). Gaps inside the layers are left to `match_names`, which names them."""
    held = sorted({i for name in found if (i := layer_index(name)) is not None})
    if held == list(range(config.num_layers)) or held != list(range(len(held))):
        return
    holds = "no layers" if not held else "layer 0" if len(held) == 1 else f"layers 0\u2013{held[-1]}"
    raise CheckpointError(f"config.json: num_hidden_layers {config.num_layers}; the checkpoint holds {holds}")


def _check_head_present(found: dict, config: NeoXConfig, head: HeadConfig) -> None:
    """A task whose output layer the checkpoint lacks (an LM head asked of a classifier) is refused in one line
    naming the heads the checkpoint has."""
    if head.task == io.TEXT_GENERATION and config.tie_word_embeddings:
        return
    keys = {our_key(n) for n in found}
    weight = next(iter(head_shapes(config, head)), None)
    if weight is None or weight in keys:
        return
    have = [t for t, (name, _) in HEAD_LAYERS.items() if f"{name}.weight" in keys] + [io.FEATURE_EXTRACTION]
    raise CheckpointError(f"checkpoint has no weights for task {head.task} ({TASK_ARCHITECTURES[head.task]}: no "
                          f"{hf_key(weight)}); it has {', '.join(have)}")
