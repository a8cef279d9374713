"""`neoxrt calibrate --weights-only --bits 4`: an fp32 or fp16 export -> an INT4 weights-only artifact
(MatMulNBits, calibration/int4.py), streamed one weight at a time.

    source graph (no external bytes) + weights as memory-mapped views (onnx_weights.py)
      --awq: the calibration windows through the graph one layer at a time on ONNX Runtime (layered.py)
             -> per activation |x|, x^2, X^T X -> per LayerNorm group, as soon as its layer is done:
             alpha search, factors folded into LayerNorm (awq.py)
      --> graph: MatMul -> MatMulNBits, data-less initializers
      --> save_streamed: each weight read, scaled, clip-searched, quantized and packed when the writer
          reaches it (64 KiB-aligned in model.onnx.data when the source's weights were external or the artifact
          passes 256 MiB)

Memory bound: the graph proto, the activation sums (K floats per activation, K x K per LayerNorm group) and
one weight at a time: its packed bytes and scales, and one column slice of int4.CHUNK_BYTES in fp32 with the clip
search's temporaries (a few times that);
untouched weights (embedding, LayerNorms) are copied block by block from the source's mapping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from neoxrt import contract as io
from neoxrt.calibration.awq import search_group
from neoxrt.calibration.data import calibration_windows, data_fingerprint, read_texts
from neoxrt.calibration.int4 import (
    BITS,
    MS_DOMAIN,
    block_scales,
    clip_search,
    column_slices,
    matmulnbits_node,
    pack_matmulnbits,
    quantize_blocks,
)
from neoxrt.calibration.layered import LayeredStats
from neoxrt.calibration.onnx_weights import ArrayTensor, MappedTensor, data_less, open_onnx
from neoxrt.calibration.options import CalibrationOptions
from neoxrt.calibration.targets import Target, lm_head, quant_targets, replace_graph, smooth_groups
from neoxrt.errors import CalibrationError

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


class _Quantizer:
    """Quantizes one weight when the writer asks for its packed bytes and keeps it until its scales are
    taken (the two initializers are written one after the other): one weight in memory at a time."""

    def __init__(self, weights: dict[str, MappedTensor], block: int, method: str, factors: dict, mean_sq: dict,
                 bits: dict[str, int]):
        self.weights, self.block, self.method, self.factors, self.mean_sq = weights, block, method, factors, mean_sq
        self.bits = bits
        self.held: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _make(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(packed [N, K/B, B*bits/8], scales [N * K/B]), computed over column slices of about CHUNK_BYTES of
        fp32 (each (block, column) is quantized on its own, so slicing N changes nothing)."""
        source = self.weights[name].numpy()
        k, n = source.shape
        s = self.factors.get(name)
        bits = self.bits.get(name, BITS)
        h = self.mean_sq.get(name)
        if h is not None and s is not None:
            h = h / np.square(s)
        packed = np.empty((n, k // self.block, self.block * bits // 8), np.uint8)
        scales = np.empty((n, k // self.block), np.float32)
        for cols, w in column_slices(source):
            if s is not None:
                w = w * s[:, None]
            if self.method == "rtn":
                chunk = block_scales(w, self.block, bits=bits)
            else:
                chunk = clip_search(w, self.block, h, bits)
            packed[cols] = pack_matmulnbits(quantize_blocks(w, chunk, bits), self.block, bits)
            scales[cols] = chunk.T
        return packed, scales.reshape(-1)

    def part(self, name: str, index: int) -> np.ndarray:
        if name not in self.held:
            self.held[name] = self._make(name)
        value = self.held[name][index]
        if index == 1:
            del self.held[name]
        return value


def _windows(src: Path, manifest: dict, texts, options: CalibrationOptions):
    from tokenizers import Tokenizer

    if not (src / io.TOKENIZER_FILE).is_file():
        raise CalibrationError(f"source artifact {src} has no {io.TOKENIZER_FILE}; calibration text needs the tokenizer")
    tokenizer = Tokenizer.from_file(str(src / io.TOKENIZER_FILE))
    return calibration_windows(texts, tokenizer, options.samples, options.seq_len, options.seed,
                               manifest["config"].get("eos_token_id"))


def _awq(src: Path, manifest: dict, model, weights, targets: list[Target], options: CalibrationOptions, data, threads,
         progress: bool, log, eight_bit: set[str]) -> tuple[dict, dict, dict, dict]:
    """(factors per weight, mean x^2 per weight, new LayerNorm tensors, calibration record). LayerNorms feeding
    only 8-bit weights (the LM head by default) get no factors: 256 levels leave them nothing to win (alpha 0
    was chosen for the final LayerNorm on the default model) and at NeoX-20B width their search is the costliest
    (K^2 N = 3.8 TFLOP per alpha for the head)."""
    from neoxrt.assets import CALIBRATION_TEXT

    texts = read_texts(data or [CALIBRATION_TEXT])
    windows = _windows(src, manifest, texts, options)
    groups = [g for g in smooth_groups(model, targets, through_cast=True) if not set(g.weights) <= eight_bit]
    acts = sorted({t.activation for t in targets})
    log(f"int4 awq: {len(windows)} windows x {options.seq_len} tokens, {len(acts)} activations, {len(groups)} "
        "LayerNorm groups")
    stats = LayeredStats(model, acts, src, threads, gram_for={g.activation for g in groups})
    by_activation = {g.activation: g for g in groups}
    mean_sq, factors, folded, record = {}, {}, {}, []
    for stage in stats.run(windows, options.batch, "calibrate: int4 statistics by layer", progress):
        for t in targets:
            if t.activation in stage:
                mean_sq[t.weight] = stage[t.activation].mean_sq
        for act, st in stage.items():
            g = by_activation.get(act)
            if g is None:
                continue
            choice = search_group([weights[w].numpy() for w in g.weights], st, options.block_size)
            for w in g.weights:
                factors[w] = choice.factors
            for name in (g.scale, g.bias):
                ln = weights[name].numpy()
                folded[name] = ArrayTensor(ln.shape, ln.dtype, lambda a=ln, s=choice.factors: (a / s).astype(a.dtype))
            record.append({"activation": g.activation, "alpha": choice.alpha,
                           "error_vs_clip_only": choice.error / choice.error_alpha0 if choice.error_alpha0 else 1.0})
    calibration = {"data": data_fingerprint(texts), "windows": int(len(windows)), "awq_groups": record}
    return factors, mean_sq, folded, calibration


def _check_blocks(targets: list[Target], weights, block: int) -> None:
    for t in targets:
        k = weights[t.weight].shape[0]
        if k % block:
            raise CalibrationError(f"--block-size {block} does not divide K = {k} of weight {t.weight} "
                                   "(pick a block that divides every weight's rows)")


def int4_targets(model, weights, options: CalibrationOptions) -> tuple[list[Target], Target | None]:
    targets = quant_targets(model, FLOATS)
    if not targets:
        raise CalibrationError("source artifact: no float MatMul weights to quantize (already quantized?)")
    head = lm_head(model, targets, io.LOGITS)
    if head is not None and options.lm_head == "float":
        targets = [t for t in targets if t != head]
    _check_blocks(targets, weights, options.block_size)
    return targets, head


def int4_from_onnx(src: Path, tmp: Path, manifest: dict, options: CalibrationOptions, data, threads, progress: bool,
                   log) -> tuple[onnx.ModelProto, dict[str, str], dict]:
    """Write the INT4 model.onnx (and model.onnx.data) into `tmp`.

    Returns:
        (the graph written, {file: sha256}, the manifest's calibration and quantization sections).
    """
    from neoxrt.export.external_data import save_streamed
    from neoxrt.export.options import INLINE_LIMIT

    model, weights = open_onnx(src)
    targets, head = int4_targets(model, weights, options)
    factors, mean_sq, lazy, calibration = {}, {}, {}, {}
    bits = {head.weight: 8} if head is not None and options.lm_head == "int8" else {}
    if options.method == "awq":
        factors, mean_sq, lazy, calibration = _awq(src, manifest, model, weights, targets, options, data, threads,
                                                   progress, log, set(bits))
    quantizer = _Quantizer(weights, options.block_size, options.method, factors, mean_sq, bits)
    by_weight = {t.weight: t for t in targets}
    by_node = {t.node: t for t in targets}
    graph = model.graph
    inits = []
    for tensor in graph.initializer:
        name = tensor.name
        if name in by_weight:
            k, n = weights[name].shape
            b = options.block_size
            packed = TensorProto(name=f"{name}.packed", data_type=TensorProto.UINT8,
                                 dims=[n, k // b, b * bits.get(name, BITS) // 8])
            scales = TensorProto(name=f"{name}.scales", data_type=tensor.data_type, dims=[n * (k // b)])
            lazy[packed.name] = ArrayTensor(packed.dims, np.uint8, lambda w=name: quantizer.part(w, 0))
            lazy[scales.name] = ArrayTensor(scales.dims, weights[name].dtype, lambda w=name: quantizer.part(w, 1))
            inits += [packed, scales]
        elif name in lazy or tensor.data_location == TensorProto.EXTERNAL:
            lazy.setdefault(name, weights[name])
            inits.append(data_less(tensor))
        else:
            inits.append(tensor)
    nodes = []
    for node in graph.node:
        t = by_node.get(node.name)
        if t is None:
            nodes.append(node)
            continue
        k, n = weights[t.weight].shape
        nodes.append(matmulnbits_node(node, k, n, options.block_size, options.accuracy_level, t.weight,
                                      bits.get(t.weight, BITS)))
    replace_graph(model, nodes, inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    # weights stay external where the source's were (its size or the exporter's threshold put them there)
    inline_limit = 0 if (src / io.WEIGHTS_FILE).is_file() else INLINE_LIMIT
    digests = save_streamed(model, lazy, tmp / io.MODEL_FILE, inline_limit)
    quantization = {"matmuls": len(targets), "bits": 4, "weights": f"int4 symmetric per block of {options.block_size} "
                    "along K (MatMulNBits)", "block_size": options.block_size,
                    "accuracy_level": options.accuracy_level, "method": options.method,
                    "lm_head": options.lm_head if head is not None else "none found",
                    "embedding": "float", "awq_layernorms": len(calibration.get("awq_groups", []))}
    return model, digests, {"calibration": calibration, "quantization": quantization}


def ort_nbits(src: Path, out_model: Path, options: CalibrationOptions) -> list[str]:
    """onnxruntime's MatMulNBitsQuantizer (round to nearest, asymmetric, per block): the baseline. Holds the
    whole model in memory."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model, weights = open_onnx(src)
    _, head = int4_targets(model, weights, options)
    exclude = [head.node] if head is not None and options.lm_head != "int4" else []
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src / io.MODEL_FILE)), bits=4, block_size=options.block_size,
                                         is_symmetric=False, accuracy_level=options.accuracy_level,
                                         nodes_to_exclude=exclude)
        quantizer.process()
        external = (src / io.WEIGHTS_FILE).is_file()
        quantizer.model.save_model_to_file(str(out_model), use_external_data_format=external)
    finally:
        root.setLevel(level)
    return [p.name for p in out_model.parent.iterdir() if p.name.startswith(io.MODEL_FILE)]
