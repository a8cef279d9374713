"""`OnnxFromCheckpoint`: checkpoint folder -> validated artifact folder (model.onnx, model.onnx.data past the
threshold, tokenizer.json, config.json, manifest.json), written atomically.

Streamed: the checkpoint is opened lazily (headers only), the graph is emitted with data-less initializers,
and the weights go from the checkpoint to model.onnx.data one block at a time (`export.external_data`), so
peak memory is one block plus the graph, whatever the model's size. The checkpoint's sha256 is computed by a
second thread while the weights are written.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import onnx

from neoxrt import contract as io
from neoxrt.errors import CheckpointError, ExportError
from neoxrt.export.external_data import initializer_bytes, save_streamed
from neoxrt.export.graph import required_inputs
from neoxrt.export.neox_onnx import PLUGIN_DOMAIN, PLUGIN_OP, PLUGIN_VERSION, onnx_from_weights
from neoxrt.export.options import ExportOptions
from neoxrt.fsutil import atomic_dir
from neoxrt.manifest import ORT_SESSION_CONFIG, write_manifest
from neoxrt.model import checkpoint_hash, read_config, resolve_checkpoint
from neoxrt.model.heads import read_head
from neoxrt.model.weights import open_checkpoint

STAGE = "export"


def save_onnx(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> list[str]:
    """Save an in-memory `model`; weights go to an external file when they pass the threshold. Returns the
    files written."""
    return list(save_streamed(model, {}, path, external_data_threshold))


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """A tokenizer.json beside the checkpoint must load and fit the model's vocabulary (it is copied into the
    artifact, and generation would fail later).

    Raises:
        CheckpointError: it does not load, it has more tokens than the model, or only vocab.json + merges.txt
            are there.
    """
    if not path.is_file():
        if all((path.parent / name).is_file() for name in ("vocab.json", "merges.txt")):
            raise CheckpointError(f"checkpoint: {path.parent} has vocab.json and merges.txt but no {path.name} (the GPT-NeoX "
                                  "tokenizer's added tokens live only there; transformers cannot load it either): copy "
                                  f"{path.name} from the model's published folder, or remove vocab.json and merges.txt "
                                  "to export without a tokenizer (the artifact then takes token ids)")
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint: {path} is not a readable tokenizer ({first})") from None
    if size > vocab_size:
        raise CheckpointError(f"checkpoint: {path} has {size} tokens; the model's vocab_size is {vocab_size}")


class _Hasher(threading.Thread):
    """The checkpoint's sha256, computed beside the export (it reads the same files; stops when told)."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.stop, self.digest, self.error = folder, threading.Event(), None, None

    def run(self) -> None:
        try:
            self.digest = checkpoint_hash(self.folder, self.stop)
        except BaseException as exc:  # re-raised in the exporting thread
            self.error = exc

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest


def validate_onnx(path: Path) -> None:
    """onnx.checker full check (with shape inference); by path, so external data works past 2 GB."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the exported graph fails onnx.checker: {first}") from None


def io_section(model: onnx.ModelProto) -> dict:
    """I/O spec with named dynamic axes, read back from the saved graph."""

    def spec(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    return {"inputs": spec(required_inputs(model.graph)), "outputs": spec(model.graph.output)}  # defaults: not the contract


# the emitted graph's form, in every manifest (calibrated artifacts copy it): bump when the graph an export of the
# same checkpoint and options would write changes, so that caches of artifacts (the benches) can tell theirs is
# stale. 1: before the manifest said; 2: the fused flavour's packed [q | k | v] (9ec4dbd); 3: the sequence
# classifier's last layer on the pooled token only; 4: static-cache causal LMs take logits_to_keep (an input with a default).
GRAPH_VERSION = 4


def export_checkpoint(checkpoint, out_dir, options: ExportOptions, force: bool = False, log=print) -> dict:
    """Export `checkpoint` to `out_dir` under `options`; returns the manifest.

    Raises:
        CheckpointError: the checkpoint is missing or invalid.
        ExportError: the output exists (without force), cannot be written, or the graph fails validation.
    """
    out_dir = Path(out_dir)
    folder = resolve_checkpoint(checkpoint)
    start = time.perf_counter()
    config = read_config(folder)
    check_tokenizer(folder / io.TOKENIZER_FILE, config.vocab_size)
    head = read_head(folder, options.task)
    options = options.for_task(head.task)  # the task the checkpoint names, checked against flags
    weights = open_checkpoint(folder, config, head)
    hasher = _Hasher(folder)
    hasher.start()
    try:
        with atomic_dir(out_dir, force, ExportError) as tmp:
            proto, lazy = onnx_from_weights(config, weights, options, head)
            log(f"opened {folder} ({initializer_bytes(proto, lazy) / 2**30:.2f} GiB of {options.dtype} weights to write)")
            digests = save_streamed(proto, lazy, tmp / io.MODEL_FILE, options.external_data_threshold)
            files = list(digests)
            sections = io_section(proto)
            del proto, lazy
            validate_onnx(tmp / io.MODEL_FILE)
            manifest = _finish(folder, tmp, files, digests, hasher.result(), config, options, sections, head)
    finally:
        hasher.stop.set()
    log(f"wrote {out_dir} ({head.task}, {options.dtype}, attention={options.attention}, opset {options.opset}) "
        f"in {time.perf_counter() - start:.1f}s")
    return manifest


def _finish(folder: Path, tmp: Path, files: list[str], digests: dict[str, str], checkpoint_sha256: str,
            config, options: ExportOptions, sections: dict, head) -> dict:
    """Copy the tokenizer and config beside the graph and write the manifest."""
    for name in io.COMPANION_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
            files.append(name)
    body = {
        "checkpoint": str(folder.resolve()),
        "checkpoint_sha256": checkpoint_sha256,
        "config": config.to_dict(),
        "export_options": options.to_dict(),
        "graph_version": GRAPH_VERSION,
        "opset": options.opset,
        "io": sections,
        "dynamic_axes": {io.BATCH: "batch size", io.SEQUENCE: "new tokens this step",
                         io.PAST_SEQUENCE: "cached tokens (0 for the prompt step)",
                         io.TOTAL_SEQUENCE: "past_sequence + sequence",
                         **({io.CACHE_SEQUENCE: "static cache slots (prompt + new tokens)"}
                            if options.kv_cache == "static" else {})},
        **head.to_dict(),  # task and id2label
    }
    if head.task != io.TEXT_GENERATION:
        body["dynamic_axes"] = {io.BATCH: "batch size", io.SEQUENCE: "tokens per row (padding included)"}
    if options.attention == "plugin":
        body["plugin"] = {"domain": PLUGIN_DOMAIN, "op_type": PLUGIN_OP, "version": PLUGIN_VERSION}
    if options.lm_head == "screened":  # ONNX Runtime runs the INT8 screen as MatMulNBits: the block that fits K
        from neoxrt.calibration.qdq import ORT_NBITS_BLOCK_KEY, nbits_block_size

        block = nbits_block_size([config.hidden_size])
        if block is not None:
            body[ORT_SESSION_CONFIG] = {ORT_NBITS_BLOCK_KEY: str(block)}
    return write_manifest(tmp, STAGE, body, files, digests)
