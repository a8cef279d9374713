"""`neoxrt calibrate --weights-only --bits 4`: an fp32 or fp16 export -> an INT4 weights-only artifact
(MatMulNBits, calibration/int4.py), streamed one weight at a time.

    source graph (no external bytes) + weights as memory-mapped views (onnx_weights.py)
      --> graph: MatMul -> MatMulNBits, data-less initializers
      --> save_streamed: each weight read, quantized and packed when the writer reaches it (64 KiB-aligned in
          model.onnx.data when the source's weights were external or the artifact passes 256 MiB):
            rtn:  round to nearest, max|w| / 7 block scales (no data)
            gptq (default): GPTQ rounding (gptq.py) against X^T X of the weight's input
            awq:  AWQ's per-channel factors (awq.py) folded into the LayerNorms, then GPTQ through them
          the statistics pulled from the calibration windows one layer at a time, as the writer reaches the
          layer (layered.py on ONNX Runtime, `_LayerStats`)

Memory bound: the graph proto, one layer's statistics (K floats per activation and its X^T X, K x K float32 or
its diagonal blocks: awq.gram_bounds; 0.35 GB at the NeoX-20B width), the windows' hidden states between
layers, and one weight at a time: its packed bytes and scales, and one column slice in fp32 (int4.CHUNK_BYTES,
GPTQ_CHUNK_BYTES under GPTQ) with its temporaries; untouched weights (embedding) are copied block by block from
the source's mapping.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from neoxrt import contract as io
from neoxrt.calibration.awq import ActivationStats, search_group
from neoxrt.calibration.data import calibration_windows, data_fingerprint, read_texts
from neoxrt.calibration.gptq import InverseFactor, gptq_quantize
from neoxrt.calibration.int4 import (
    BITS,
    CHUNK_BYTES,
    MS_DOMAIN,
    block_scales,
    column_slices,
    matmulnbits_node,
    pack_matmulnbits,
    quantize_blocks,
)
from neoxrt.calibration.layered import LayeredStats
from neoxrt.calibration.onnx_weights import ArrayTensor, MappedTensor, data_less, open_onnx
from neoxrt.calibration.options import CalibrationOptions, int4_samples
from neoxrt.calibration.targets import Target, lm_head, quant_targets, replace_graph, smooth_groups
from neoxrt.errors import CalibrationError

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
GPTQ_CHUNK_BYTES = 256 << 20  # fp32 bytes of one column slice under GPTQ (its row loop runs once per slice)


class _LayerStats:
    """Calibration statistics pulled one layer at a time, as the writer reaches the weights that need them
    (the graph's initializers are in layer order): a layer's X^T X matrices live from its stage until its last
    weight is quantized, so memory holds one layer's statistics whatever the depth.

    Per activation: GPTQ's inverse factor (of X^T X, through the AWQ factors where the method searches them);
    per LayerNorm group (awq): the alpha search's factors, folded into the LayerNorm when the writer reaches it.
    """

    def __init__(self, src: Path, manifest: dict, model, weights, targets: list[Target], quantized: set[str],
                 options: CalibrationOptions, data, threads, progress: bool, log):
        from neoxrt.assets import CALIBRATION_TEXT

        texts = read_texts(data or [CALIBRATION_TEXT])
        windows = _windows(src, manifest, texts, options)
        self.weights, self.block = weights, options.block_size
        self.groups = [g for g in smooth_groups(model, targets, through_cast=True) if set(g.weights) & quantized] \
            if options.method == "awq" else []
        self.activation = {t.weight: t.activation for t in targets if t.weight in quantized}
        self.users = Counter(self.activation.values())
        acts = sorted(self.users)
        log(f"int4 {options.method}: {len(windows)} windows x {options.seq_len} tokens, {len(acts)} activations"
            + (f", {len(self.groups)} LayerNorm groups" if self.groups else ""))
        source = onnx.ModelProto()
        source.CopyFrom(model)  # the stages are cut when pulled, after the writer has rewritten `model`
        stats = LayeredStats(source, acts, src, threads, gram_for=set(acts))
        self._stages = stats.run(windows, options.batch, f"calibrate: int4 {options.method} by layer", progress)
        self._stats: dict[str, ActivationStats] = {}
        self._factor: dict[str, InverseFactor] = {}
        self.factors: dict[str, np.ndarray] = {}  # per weight (awq)
        self.record: list[dict] = []
        self.calibration = {"data": data_fingerprint(texts), "windows": int(len(windows))}

    def close(self) -> None:
        self._stages.close()  # the per-layer sessions' folder

    def _until(self, activation: str) -> None:
        while activation not in self._stats and activation not in self._factor:
            stage = next(self._stages)
            for group in self.groups:
                if group.activation in stage:
                    self._search(group, stage[group.activation])
            self._stats.update({a: st for a, st in stage.items() if a in self.users})

    def _search(self, group, st: ActivationStats) -> None:
        choice = search_group([self.weights[w].numpy() for w in group.weights], st, self.block)
        for w in group.weights:
            self.factors[w] = choice.factors
        self.factors[group.scale] = self.factors[group.bias] = choice.factors
        self.record.append({"activation": group.activation, "alpha": choice.alpha,
                            "error_vs_rtn": choice.error / choice.error_alpha0 if choice.error_alpha0 else 1.0})

    def folded(self, name: str, value: np.ndarray) -> np.ndarray:
        """A LayerNorm scale or bias divided by its group's factors (the stage is run if it has not been)."""
        self._until(next(g.activation for g in self.groups if name in (g.scale, g.bias)))
        return (value / self.factors[name]).astype(value.dtype)

    def inverse_factor(self, weight: str) -> InverseFactor:
        """GPTQ's factor for `weight`'s input; the activation's statistics are dropped after its last weight."""
        act = self.activation[weight]
        self._until(act)
        if act not in self._factor:
            st = self._stats.pop(act)
            s = self.factors.get(weight)
            grams = st.grams if s is None else [(a, b, g / s[a:b, None] / s[None, a:b]) for a, b, g in st.grams]
            self._factor[act] = InverseFactor.of(grams)
        factor = self._factor[act]
        self.users[act] -= 1
        if not self.users[act]:
            del self._factor[act]
        return factor


class _Quantizer:
    """Quantizes one weight when the writer asks for its packed bytes and keeps it until its scales are
    taken (the two initializers are written one after the other): one weight in memory at a time."""

    def __init__(self, weights: dict[str, MappedTensor], block: int, bits: dict[str, int], stats: _LayerStats | None):
        self.weights, self.block, self.bits, self.stats = weights, block, bits, stats
        self.held: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _make(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(packed [N, K/B, B*bits/8], scales [N * K/B]), computed over column slices of the weight (each
        output column is quantized on its own, so slicing N changes nothing): round to nearest, or GPTQ against
        the calibration statistics (4-bit weights, methods gptq and awq)."""
        source = self.weights[name].numpy()
        k, n = source.shape
        bits = self.bits.get(name, BITS)
        gptq = self.stats is not None and bits == BITS
        factor = self.stats.inverse_factor(name) if gptq else None
        s = self.stats.factors.get(name) if gptq else None
        packed = np.empty((n, k // self.block, self.block * bits // 8), np.uint8)
        scales = np.empty((n, k // self.block), np.float32)
        for cols, w in column_slices(source, GPTQ_CHUNK_BYTES if gptq else CHUNK_BYTES):
            if s is not None:
                w = w * s[:, None]
            if gptq:
                q, chunk = gptq_quantize(w, factor, self.block)
            else:
                chunk = block_scales(w, self.block, bits=bits)
                q = quantize_blocks(w, chunk, bits)
            packed[cols] = pack_matmulnbits(q, self.block, bits)
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
        raise CalibrationError(f"source artifact {src} has no {io.TOKENIZER_FILE}; calibration text needs the tokenizer "
                               f"(or --method rtn, which reads none)")
    tokenizer = Tokenizer.from_file(str(src / io.TOKENIZER_FILE))
    return calibration_windows(texts, tokenizer, int4_samples(options, manifest["config"]["hidden_size"]),
                               options.seq_len, options.seed, manifest["config"].get("eos_token_id"))


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

    model, weights = open_onnx(src)
    targets, head = int4_targets(model, weights, options)
    bits = {head.weight: 8} if head is not None and options.lm_head == "int8" else {}
    stats = None
    if options.method in ("gptq", "awq"):
        stats = _LayerStats(src, manifest, model, weights, targets, {t.weight for t in targets if t.weight not in bits},
                            options, data, threads, progress, log)
    try:
        digests = _write(src, tmp, model, weights, targets, options, bits, stats)
    finally:
        if stats is not None:
            stats.close()
    calibration = {} if stats is None else {**stats.calibration, **({"awq_groups": stats.record} if stats.groups else {})}
    quantization = {"matmuls": len(targets), "bits": 4, "weights": f"int4 symmetric per block of {options.block_size} "
                    "along K (MatMulNBits)", "block_size": options.block_size,
                    "accuracy_level": options.accuracy_level, "method": options.method,
                    "rounding": "gptq" if stats is not None else "nearest",
                    "lm_head": options.lm_head if head is not None else "none found",
                    "embedding": "float", "awq_layernorms": len(stats.groups) if stats is not None else 0}
    return model, digests, {"calibration": calibration, "quantization": quantization}


def _write(src: Path, tmp: Path, model, weights, targets: list[Target], options: CalibrationOptions, bits: dict,
           stats: _LayerStats | None) -> dict[str, str]:
    """The MatMulNBits graph and its weights, each quantized when the writer reaches it."""
    from neoxrt.export.external_data import save_streamed
    from neoxrt.export.options import INLINE_LIMIT

    quantizer = _Quantizer(weights, options.block_size, bits, stats)
    lazy = {}
    for group in stats.groups if stats is not None else ():
        for name in (group.scale, group.bias):
            ln = weights[name].numpy()
            lazy[name] = ArrayTensor(ln.shape, ln.dtype, lambda n=name, a=ln: stats.folded(n, a))
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
    return save_streamed(model, lazy, tmp / io.MODEL_FILE, inline_limit)


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
