"""`neoxrt calibrate`: an fp32 export -> an INT8 artifact (Q/DQ graph, same inputs and outputs). Head exports
(`--task`: input_ids and attention_mask, no KV cache) calibrate the same way; the manifest keeps task and id2label.

    source artifact --(windows of calibration text)--> pass 1: per-channel max|x| of every MatMul input
        --> SmoothQuant factors (LayerNorm-fed inputs) --> pass 2 (percentile/entropy): |x/s| histograms
        --> thresholds --> fold s into LayerNorm/weights --> Q/DQ graph --> model.onnx + cache + summary

The statistics and thresholds are kept in calibration_cache.npz; a re-run with the same source, data and
options reuses them, a cache made with anything else is refused (pass recalibrate to replace it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from neoxrt import contract as io
from neoxrt.calibration.data import calibration_windows, data_fingerprint, read_texts
from neoxrt.calibration.int4_artifact import int4_from_onnx, ort_nbits
from neoxrt.calibration.observe import StatsSession, abs_histograms, channel_absmax
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.calibration.qdq import ORT_NBITS_BLOCK_KEY, QMAX, REDUCED_QMAX, nbits_block_size, qdq_from_onnx
from neoxrt.calibration.ranges import choose_threshold
from neoxrt.calibration.smoothquant import fold_factors, group_factors
from neoxrt.calibration.targets import quant_targets, smooth_groups
from neoxrt.errors import ArtifactError, CalibrationError
from neoxrt.fsutil import atomic_dir
from neoxrt.manifest import ORT_SESSION_CONFIG, read_manifest, write_manifest

STAGE = "calibrate"
CACHE_FILE = "calibration_cache.npz"
SUMMARY_FILE = "calibration.md"
RANGES_FILE = "calibration_ranges.json"
COPIED = ("export_options", "graph_version", "opset", "config", "checkpoint", "checkpoint_sha256", "dynamic_axes", "task",
          "id2label")
OUTLIER_RATIO = 20  # largest / median channel max|x| past which a tensor is flagged


def _source_manifest(src: Path, bits: int = 8) -> dict:
    try:
        manifest = read_manifest(src, ("export",))
    except ArtifactError as exc:
        raise CalibrationError(f"source artifact: {exc}") from None
    if manifest.get("task", io.TEXT_GENERATION) != io.TEXT_GENERATION and bits == 4:
        raise CalibrationError(f"source artifact {src} is a {manifest['task']} export; INT4 is for text-generation "
                               "exports (head artifacts calibrate to INT8: drop --bits 4)")
    options = manifest.get("export_options", {})
    if bits == 4 and options.get("dtype") not in ("fp32", "fp16"):
        raise CalibrationError(f"source artifact {src} is {options.get('dtype')}; INT4 needs an fp32 or fp16 export")
    if bits == 8 and options.get("dtype") != "fp32":
        raise CalibrationError(f"source artifact {src} is {options.get('dtype')}; calibration needs an fp32 export "
                               "(neoxrt export --dtype fp32)")
    if manifest.get("plugin"):
        raise CalibrationError(f"source artifact {src} is a plugin graph; calibrate a fused or decomposed export")
    if options.get("lm_head") == "screened":
        raise CalibrationError(f"source artifact {src} has a screened LM head (an INT8 copy already); calibrate an "
                               "export with the exact head (neoxrt export without --lm-head screened)")
    return manifest


class CalibrationCache:
    """Per-channel max|x| and thresholds under a key (source graph, data, options)."""

    def __init__(self, key: dict, absmax: dict[str, np.ndarray], thresholds: dict[str, float]):
        self.key, self.absmax, self.thresholds = key, absmax, thresholds

    def save(self, path: Path) -> None:
        arrays = {"key": np.array(json.dumps(self.key, sort_keys=True))}
        for i, name in enumerate(sorted(self.absmax)):
            arrays[f"name_{i}"] = np.array(name)
            arrays[f"absmax_{i}"] = self.absmax[name]
            arrays[f"threshold_{i}"] = np.array(self.thresholds.get(name, np.nan), np.float64)
        fd, tmp = tempfile.mkstemp(prefix=".cache-", suffix=".npz", dir=path.parent)
        os.close(fd)
        np.savez(tmp, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> CalibrationCache:
        try:
            with np.load(path, allow_pickle=False) as data:
                key = json.loads(str(data["key"]))
                names = [str(data[f"name_{i}"]) for i in range(sum(k.startswith("name_") for k in data.files))]
                absmax = {n: data[f"absmax_{i}"] for i, n in enumerate(names)}
                thresholds = {n: float(data[f"threshold_{i}"]) for i, n in enumerate(names)}
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(f"calibration cache {path} is unreadable ({exc.__class__.__name__}); delete it "
                                   "or pass --recalibrate") from None
        return cls(key, absmax, thresholds)


def _key_difference(old: dict, new: dict) -> str:
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{section} differs")
    return ", ".join(diffs) or "key differs"


def _outlier_ratio(channels: np.ndarray) -> float:
    med = float(np.median(channels))
    return float(channels.max() / med) if med > 0 else float("inf")


def summarise(absmax: dict[str, np.ndarray], factors: dict[str, np.ndarray], thresholds: dict[str, float]) -> list[dict]:
    rows = []
    for name, channels in absmax.items():
        after = channels / factors[name] if name in factors else channels
        rows.append({"activation": name, "absmax": float(channels.max()), "outlier_ratio": _outlier_ratio(channels),
                     "smoothquant_max_factor": float(factors[name].max()) if name in factors else None,
                     "absmax_after_smoothing": float(after.max()), "outlier_ratio_after": _outlier_ratio(after),
                     "threshold": thresholds.get(name)})
    return rows


def summary_markdown(rows: list[dict], options: CalibrationOptions) -> str:
    sq = f"alpha {options.smoothquant}" if options.smoothquant else "off"
    lines = [f"# Calibration ranges ({options.method}, SmoothQuant {sq})", "",
             f"outlier ratio = largest channel max|x| / median channel max|x|; over {OUTLIER_RATIO} marks an outlier "
             "tensor.", "",
             "| activation | max abs | outlier ratio | SmoothQuant max s | max abs after | ratio after | threshold |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = f"{r['smoothquant_max_factor']:.2f}" if r["smoothquant_max_factor"] is not None else "-"
        t = f"{r['threshold']:.4g}" if r["threshold"] is not None else "-"
        flag = " **outliers**" if r["outlier_ratio"] > OUTLIER_RATIO else ""
        lines.append(f"| {r['activation']} | {r['absmax']:.4g} | {r['outlier_ratio']:.1f}{flag} | {s} | "
                     f"{r['absmax_after_smoothing']:.4g} | {r['outlier_ratio_after']:.1f} | {t} |")
    return "\n".join(lines) + "\n"


def ort_dynamic(src_model: Path, out_model: Path) -> None:
    """onnxruntime's quantize_dynamic on every MatMul with a constant weight (the baseline users reach for)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it warns on the root logger to run its pre-processing, which we do not need
    try:
        quantize_dynamic(str(src_model), str(out_model), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True},
                         use_external_data_format=(src_model.parent / io.WEIGHTS_FILE).is_file())
    finally:
        root.setLevel(level)


def _cache_key(model_sha256: str, texts, options: CalibrationOptions) -> dict:
    return {"source": {"model_sha256": model_sha256},
            "data": {d["file"]: d["sha256"] for d in data_fingerprint(texts)},
            "options": {k: v for k, v in options.to_dict().items() if k != "batch"}}


def _activation_ranges(model, src: Path, manifest: dict, targets, groups, texts, options: CalibrationOptions, key: dict,
                       cache_path: Path, recalibrate: bool, threads, progress: bool, log):
    """(per-channel max|x|, SmoothQuant factors, thresholds, windows or None) -- from the cache when it
    matches `key`, else measured."""
    from tokenizers import Tokenizer

    acts = sorted({t.activation for t in targets})
    if cache_path.is_file() and not recalibrate:
        cached = CalibrationCache.load(cache_path)
        if cached.key != key:
            raise CalibrationError(f"calibration cache {cache_path} was made for other inputs "
                                   f"({_key_difference(cached.key, key)}); pass --recalibrate to replace it")
        log(f"reusing calibration cache {cache_path}")
        factors = group_factors(model, groups, cached.absmax, options.smoothquant) if groups else {}
        return cached.absmax, factors, cached.thresholds, None
    if not (src / io.TOKENIZER_FILE).is_file():
        raise CalibrationError(f"source artifact {src} has no {io.TOKENIZER_FILE}; calibration text needs the tokenizer")
    tokenizer = Tokenizer.from_file(str(src / io.TOKENIZER_FILE))
    windows = calibration_windows(texts, tokenizer, options.samples, options.seq_len, options.seed,
                                  manifest["config"].get("eos_token_id"))
    log(f"calibrating on {len(windows)} windows x {options.seq_len} tokens, {len(acts)} activations")
    stats = StatsSession(model, acts, threads)
    absmax = channel_absmax(stats, windows, options.batch, progress)
    factors = group_factors(model, groups, absmax, options.smoothquant) if groups else {}
    top = {a: float((absmax[a] / factors[a]).max() if a in factors else absmax[a].max()) for a in acts}
    hists = None
    if options.method in ("percentile", "entropy"):
        hists = abs_histograms(stats, windows, options.batch, top, factors, progress)
    thresholds = {a: choose_threshold(options.method, top[a], None if hists is None else hists[a], options.percentile)
                  for a in acts}
    return absmax, factors, thresholds, windows


def _qdq_artifact(src: Path, out: Path, tmp: Path, manifest: dict, body: dict, files: list[str], options: CalibrationOptions,
                  data, cache, recalibrate: bool, threads, progress: bool, log) -> onnx.ModelProto:
    """Write the Q/DQ model.onnx (and cache and range summary) into `tmp`; fills `body` and `files`."""
    from neoxrt.assets import CALIBRATION_TEXT
    from neoxrt.export.exporter import save_onnx
    from neoxrt.export.options import TWO_GB

    model = onnx.load(str(src / io.MODEL_FILE))
    targets = quant_targets(model)
    if not targets:
        raise CalibrationError(f"source artifact {src}: no fp32 MatMul weights to quantize")
    groups = smooth_groups(model, targets) if options.smoothquant and not options.weights_only else []
    texts, absmax, thresholds, factors, windows, key = [], {}, {}, {}, None, None
    cache_path = Path(cache) if cache else out / CACHE_FILE
    if not options.weights_only:  # weights-only needs no data: weight scales come from the weights
        texts = read_texts(data or [CALIBRATION_TEXT])
        key = _cache_key(body["source"]["model_sha256"], texts, options)
        absmax, factors, thresholds, windows = _activation_ranges(model, src, manifest, targets, groups, texts, options,
                                                                  key, cache_path, recalibrate, threads, progress, log)
    else:  # how ONNX Runtime should run it: the MatMulNBits block that fits every weight (see qdq.py)
        dims = {init.name: init.dims for init in model.graph.initializer}
        block = nbits_block_size([dims[t.weight][0] for t in targets])
        if block is not None:
            body[ORT_SESSION_CONFIG] = {ORT_NBITS_BLOCK_KEY: str(block)}
    fold_factors(model, groups, factors)
    qdq_from_onnx(model, targets, thresholds, options.weights_only,
                  REDUCED_QMAX if options.weight_range == "reduced" else QMAX)
    files += save_onnx(model, tmp / io.MODEL_FILE, TWO_GB)
    if not options.weights_only:
        CalibrationCache(key, absmax, thresholds).save(tmp / CACHE_FILE)
        if cache_path.resolve() != (out / CACHE_FILE).resolve():
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            CalibrationCache(key, absmax, thresholds).save(cache_path)
        rows = summarise(absmax, factors, thresholds)
        (tmp / SUMMARY_FILE).write_text(summary_markdown(rows, options))
        (tmp / RANGES_FILE).write_text(json.dumps(rows, indent=1) + "\n")
        files += [CACHE_FILE, SUMMARY_FILE, RANGES_FILE]
        body["calibration"].update(
            data=data_fingerprint(texts), windows=None if windows is None else int(len(windows)),
            outlier_tensors=[r["activation"] for r in rows if r["outlier_ratio"] > OUTLIER_RATIO])
    body["quantization"] = {
        "matmuls": len(targets), "weights": "int8 symmetric per output channel",
        "activations": "fp32" if options.weights_only else "int8 symmetric per tensor",
        "smoothquant_layernorms": len(groups)}
    return model


def calibrate_artifact(src, out, options: CalibrationOptions, data: list[Path] | None = None, force: bool = False,
                       cache: Path | None = None, recalibrate: bool = False, threads: int | None = None,
                       progress: bool = True, log=print) -> dict:
    """Calibrate the fp32 artifact `src` into the INT8 artifact `out` (or, with options.bits 4, the fp32 or
    fp16 artifact into an INT4 weights-only one: int4_artifact.py); returns the manifest.

    Raises:
        CalibrationError: unusable source, data, options or cache; or `out` exists without force.
    """
    from neoxrt.export.exporter import io_section, validate_onnx

    src, out = Path(src), Path(out)
    start = time.perf_counter()
    manifest = _source_manifest(src, options.bits)
    body = {k: manifest[k] for k in COPIED if k in manifest}
    body["source"] = {"artifact": str(src.resolve()), "model_sha256": manifest["files"][io.MODEL_FILE]}
    body["calibration"] = {"options": options.to_dict()}
    digests = {}
    with atomic_dir(out, force, CalibrationError) as tmp:
        files = []
        if options.bits == 4:
            body["precision"] = "int4"
            if options.method == "ort-nbits":
                files = ort_nbits(src, tmp / io.MODEL_FILE, options)
                model = onnx.load(str(tmp / io.MODEL_FILE), load_external_data=False)
                body["quantization"] = {"scheme": "onnxruntime MatMulNBitsQuantizer (baseline; asymmetric, ONNX "
                                        "Runtime only)", "bits": 4, "block_size": options.block_size,
                                        "accuracy_level": options.accuracy_level}
            else:
                model, digests, sections = int4_from_onnx(src, tmp, manifest, options, data, threads, progress, log)
                files = list(digests)
                body["calibration"].update(sections["calibration"])
                body["quantization"] = sections["quantization"]
        elif options.method == "ort-dynamic":
            ort_dynamic(src / io.MODEL_FILE, tmp / io.MODEL_FILE)
            model = onnx.load(str(tmp / io.MODEL_FILE), load_external_data=False)
            files = [p.name for p in tmp.iterdir()]
            body["quantization"] = {"scheme": "onnxruntime quantize_dynamic (baseline; ONNX Runtime only)"}
        else:
            model = _qdq_artifact(src, out, tmp, manifest, body, files, options, data, cache, recalibrate, threads,
                                  progress, log)
        validate_onnx(tmp / io.MODEL_FILE)
        body["io"] = io_section(model)
        for name in io.COMPANION_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                files.append(name)
        result = write_manifest(tmp, STAGE, body, sorted(set(files)), digests)
    log(f"wrote {out} (int{options.bits}, {'weights only' if options.weights_only else ''} {options.method}) "
        f"in {time.perf_counter() - start:.1f}s")
    return result

