"""`OnnxFromCheckpoint`: checkpoint folder -> validated artifact folder (model.onnx, tokenizer.json,
config.json, manifest.json), written atomically."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import onnx

from neoxrt import contract as io
from neoxrt.errors import ExportError
from neoxrt.export.neox_onnx import PLUGIN_DOMAIN, PLUGIN_OP, PLUGIN_VERSION, onnx_from_model
from neoxrt.export.options import ExportOptions
from neoxrt.fsutil import atomic_dir
from neoxrt.manifest import write_manifest
from neoxrt.model import checkpoint_hash, load_model, read_config, resolve_checkpoint

STAGE = "export"


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> list[str]:
    """Save `model`; weights go to an external file when they pass the threshold. Returns the files written."""
    if initializer_bytes(model) > external_data_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=io.WEIGHTS_FILE, size_threshold=1024)
        return [path.name, io.WEIGHTS_FILE]
    onnx.save_model(model, str(path))
    return [path.name]


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

    return {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


def export_checkpoint(checkpoint, out_dir, options: ExportOptions, force: bool = False, log=print) -> dict:
    """Export `checkpoint` to `out_dir` under `options`; returns the manifest.

    Raises:
        CheckpointError: the checkpoint is missing or invalid.
        ExportError: the output exists (without force), cannot be written, or the graph fails validation.
    """
    out_dir = Path(out_dir)
    folder = resolve_checkpoint(checkpoint)
    start = time.perf_counter()
    with atomic_dir(out_dir, force, ExportError) as tmp:
        model = load_model(folder)
        log(f"loaded {folder} ({model.num_parameters():,} parameters) in {time.perf_counter() - start:.1f}s")
        proto = onnx_from_model(model, options)
        del model
        files = save_onnx(proto, tmp / io.MODEL_FILE, options.external_data_threshold)
        sections = io_section(proto)
        del proto
        validate_onnx(tmp / io.MODEL_FILE)
        for name in (io.TOKENIZER_FILE, io.CONFIG_FILE):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
                files.append(name)
        body = {
            "checkpoint": str(folder.resolve()),
            "checkpoint_sha256": checkpoint_hash(folder),
            "config": read_config(folder).to_dict(),
            "export_options": options.to_dict(),
            "opset": options.opset,
            "io": sections,
            "dynamic_axes": {io.BATCH: "batch size", io.SEQUENCE: "new tokens this step",
                             io.PAST_SEQUENCE: "cached tokens (0 for the prompt step)",
                             io.TOTAL_SEQUENCE: "past_sequence + sequence",
                             **({io.CACHE_SEQUENCE: "static cache slots (prompt + new tokens)"}
                                if options.kv_cache == "static" else {})},
        }
        if options.attention == "plugin":
            body["plugin"] = {"domain": PLUGIN_DOMAIN, "op_type": PLUGIN_OP, "version": PLUGIN_VERSION}
        manifest = write_manifest(tmp, STAGE, body, files)
    log(f"wrote {out_dir} ({options.dtype}, attention={options.attention}, opset {options.opset}) "
        f"in {time.perf_counter() - start:.1f}s")
    return manifest
