"""INT4 weights: symmetric per-block quantization of a MatMul weight and the two graph forms that run it.

A weight W [K, N] is cut along K into blocks of B rows; each (block, output column) has one positive scale
and int4 values q in [-8, 7], W ~ q * scale. No zero points: TensorRT takes none, and both forms stay the
same numbers.

ONNX Runtime form (the artifact), one node, weights packed as ONNX Runtime reads them (no repacking at load):

    x --MatMulNBits(com.microsoft; K, N, bits 4, block_size B, accuracy_level)--> y
          B: uint8 [N, K/B, B/2]   (q + 8, two per byte, low nibble first; no zero point = 8)
          scales: [N * K/B]        (the activation's float type)

TensorRT form (`dq_from_matmulnbits`, used by `tensorrt_ready`), ONNX opset 21 block quantization:

    W_int4 [K, N] --DequantizeLinear(scale [K/B, N], axis 0, block_size B)--> W [K, N] --+
    x -------------------------------------------------------------------------------- MatMul --> y
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from neoxrt.calibration.targets import replace_graph

BITS = 4
QMIN, QMAX = -8, 7
# the LM head may take 8 bits (same layout, one byte per value, zero point 128; the TensorRT form dequantizes it)
LEVELS = {4: (-8, 7), 8: (-128, 127)}
MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two from 16
DQ_OPSET = 21  # DequantizeLinear with INT4 and block_size
CHUNK_BYTES = 64 << 20  # fp32 bytes of one weight slice being quantized or searched


def column_slices(weight, chunk_bytes: int = CHUNK_BYTES):
    """Yield (column slice, its fp32 values) of a [K, N] weight (an array or a memory map) in slices of about
    `chunk_bytes` of fp32: per-block quantization and the output error are per column, so slicing N changes
    neither, and a weight never needs to be whole in fp32."""
    k, n = weight.shape
    step = max(1, chunk_bytes // (4 * k))
    for c in range(0, n, step):
        yield slice(c, c + step), np.asarray(weight[:, c: c + step], np.float32)


def block_scales(w: np.ndarray, block: int, ratio: np.ndarray | float = 1.0, bits: int = BITS) -> np.ndarray:
    """[K, N] -> [K/B, N] scales max|w| / 7 * ratio (ratio: a scalar or [K/B, N]); 1 for all-zero blocks."""
    amax = np.abs(w.reshape(-1, block, w.shape[1])).max(axis=1)
    return np.where(amax > 0, amax / LEVELS[bits][1] * ratio, 1.0).astype(np.float32)


def quantize_blocks(w: np.ndarray, scales: np.ndarray, bits: int = BITS) -> np.ndarray:
    """[K, N] and scales [K/B, N] -> int8 [K, N] in [-8, 7] (bits 8: [-128, 127])."""
    k, n = w.shape
    blocks = w.reshape(scales.shape[0], -1, n) / scales[:, None, :]
    return np.clip(np.rint(blocks), *LEVELS[bits]).astype(np.int8).reshape(k, n)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    k, n = q.shape
    return (q.reshape(scales.shape[0], -1, n) * scales[:, None, :]).reshape(k, n).astype(np.float32)


def pack_matmulnbits(q: np.ndarray, block: int, bits: int = BITS) -> np.ndarray:
    """int [K, N] in [-8, 7] -> uint8 [N, K/B, B/2] (q + 8, element 2j in the low nibble of byte j);
    bits 8: uint8 [N, K/B, B] (q + 128)."""
    k, n = q.shape
    if bits == 8:
        return (q.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block)
    u = (q.T.astype(np.int16) + 8).astype(np.uint8).reshape(n, k // block, block // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)


def unpack_matmulnbits(packed: np.ndarray, k: int, bits: int = BITS) -> np.ndarray:
    """uint8 [N, K/B, B/2] (bits 8: [N, K/B, B]) -> int [K, N] in the signed range."""
    n = packed.shape[0]
    if bits == 8:
        return (packed.reshape(n, k).astype(np.int16) - 128).T.copy()
    u = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k)
    return (u.astype(np.int8) - 8).T.copy()


def int4_tensor(name: str, q: np.ndarray) -> TensorProto:
    """An ONNX INT4 initializer from int values in [-8, 7] (two per byte, first element in the low nibble)."""
    flat = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    tensor = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(q.shape))
    tensor.raw_data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return tensor


def matmulnbits_node(node: onnx.NodeProto, k: int, n: int, block: int, accuracy_level: int,
                     weight: str, bits: int = BITS) -> onnx.NodeProto:
    """The MatMulNBits replacing MatMul `node` (x @ W), reading `weight`.packed and `weight`.scales."""
    return helper.make_node("MatMulNBits", [node.input[0], f"{weight}.packed", f"{weight}.scales"], list(node.output),
                            name=node.name, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=accuracy_level)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def dq_from_matmulnbits(model: onnx.ModelProto, base_dir: str | None = None) -> onnx.ModelProto:
    """Rewrite every 4-bit MatMulNBits of `model` in place into INT4 DequantizeLinear (block on K) -> MatMul,
    the form TensorRT builds weight-only INT4 from; the opset is raised to 21 where lower. Same numbers.
    8-bit MatMulNBits (an 8-bit LM head) become a float weight (its dequantized values; TensorRT takes block
    quantization for INT4 only) and MatMul.

    Args:
        base_dir: the model's folder, to read weights kept in external data.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, added, dropped = [], [], set()
    for node in graph.node:
        a = _attrs(node)
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN or a.get("bits") not in LEVELS or len(node.input) > 3:
            nodes.append(node)
            continue
        k, n, block = a["K"], a["N"], a["block_size"]
        packed = numpy_helper.to_array(inits[node.input[1]], base_dir or "")
        scales = numpy_helper.to_array(inits[node.input[2]], base_dir or "")
        base = node.input[1].removesuffix(".packed")
        q = unpack_matmulnbits(packed.reshape(n, k // block, -1), k, a["bits"])
        block_scale = scales.reshape(n, k // block).T.copy()
        dropped |= {node.input[1], node.input[2]}
        if a["bits"] == 8:
            deq = dequantize_blocks(q, block_scale.astype(np.float32)).astype(scales.dtype)
            added.append(numpy_helper.from_array(deq, f"{base}.dequantized"))
        else:
            added += [int4_tensor(f"{base}.int4", q), numpy_helper.from_array(block_scale, f"{base}.block_scales")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{base}.int4", f"{base}.block_scales"],
                                          [f"{base}.dequantized"], name=f"{node.name}/weight/DequantizeLinear", axis=0,
                                          block_size=block))
        nodes.append(helper.make_node("MatMul", [node.input[0], f"{base}.dequantized"], list(node.output), name=node.name))
    if not dropped:
        return model
    kept = [t for t in graph.initializer if t.name not in dropped]
    replace_graph(model, nodes, kept + added, min_opset=DQ_OPSET)
    if not any(n.domain == MS_DOMAIN for n in graph.node):
        kept_ops = [o for o in model.opset_import if o.domain != MS_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept_ops)
    return model
