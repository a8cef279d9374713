"""Reference semantics of our attention plugin node (numpy), and its registration with ONNX Runtime
through onnxruntime-extensions' Python custom ops, so `plugin` exports run end to end on CPU.

    GptNeoxAttention(qkv [B,S,3*H*D], cos [B,S,R] f32, sin [B,S,R] f32, mask [B,T] int32,
                     past_key [B,H,P,D], past_value [B,H,P,D])
        -> (out [B,S,H*D], present_key [B,H,T,D], present_value [B,H,T,D]),  T = P + S
    attributes: num_heads, head_size, rotary_dim, scale (+ plugin_namespace, plugin_version, aot for TensorRT)

Rotary (rotate-half) on the first rotary_dim channels of q and k, causal + padding mask, fp32 softmax.
"""

from __future__ import annotations

import numpy as np

CONTRIB_DOMAIN = "ai.onnx.contrib"


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    r = cos.shape[-1]
    cos4, sin4 = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)  # [B,1,S,R]
    x_rot, x_pass = x[..., :r], x[..., r:]
    rotated = np.concatenate([-x_rot[..., r // 2:], x_rot[..., : r // 2]], axis=-1)
    return np.concatenate([x_rot * cos4 + rotated * sin4, x_pass], axis=-1)


def gpt_neox_attention(qkv, cos, sin, mask, past_key, past_value, *, num_heads, head_size, scale):
    """The plugin's contract in numpy (dtype of qkv and the cache is kept; scores in fp32)."""
    b, s, _ = qkv.shape
    heads = qkv.reshape(b, s, num_heads, 3 * head_size).transpose(0, 2, 1, 3)  # [B,H,S,3D]
    q, k, v = np.split(heads, 3, axis=-1)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k_all = np.concatenate([past_key, k.astype(past_key.dtype)], axis=2)  # [B,H,T,D]
    v_all = np.concatenate([past_value, v.astype(past_value.dtype)], axis=2)
    t = mask.shape[1]
    causal = np.arange(t)[None, :] <= (np.arange(s) + (t - s))[:, None]  # [S,T]
    allowed = causal[None, None] & mask.astype(bool)[:, None, None, :]  # [B,1,S,T]
    scores = np.matmul(q.astype(np.float32), k_all.astype(np.float32).transpose(0, 1, 3, 2)) * np.float32(scale)
    scores = np.where(allowed, scores, np.finfo(np.float32).min)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.matmul(probs.astype(v_all.dtype), v_all).transpose(0, 2, 1, 3).reshape(b, s, num_heads * head_size)
    return out, k_all, v_all


_REGISTERED: set[str] = set()


def register_contrib_op(op_type: str, impl) -> None:
    """Register `impl(qkv, cos, sin, mask, past_key, past_value, num_heads, head_size, rotary_dim, scale)
    -> (out, present_key, present_value)` as `op_type` in onnxruntime-extensions' domain (once per op type)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    if op_type in _REGISTERED:
        return
    f32, i32 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32

    @onnx_op(op_type=op_type, domain=CONTRIB_DOMAIN, inputs=[f32, f32, f32, i32, f32, f32], outputs=[f32, f32, f32],
             attrs={"num_heads": PyCustomOpDef.dt_int64, "head_size": PyCustomOpDef.dt_int64,
                    "rotary_dim": PyCustomOpDef.dt_int64, "scale": PyCustomOpDef.dt_float,
                    "plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string,
                    "aot": PyCustomOpDef.dt_int64})
    def _attention(qkv, cos, sin, mask, past_key, past_value, **attrs):
        return impl(qkv, cos, sin, mask, past_key, past_value, int(attrs["num_heads"]), int(attrs["head_size"]),
                    int(attrs["rotary_dim"]), float(attrs["scale"]))

    _REGISTERED.add(op_type)


def onnxruntime_session_options():
    """SessionOptions with our op registered (domain ai.onnx.contrib) through onnxruntime-extensions, the numpy
    reference as its implementation."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    from neoxrt.export.neox_onnx import PLUGIN_OP

    register_contrib_op(PLUGIN_OP, lambda qkv, cos, sin, mask, pk, pv, heads, head, rotary, scale: gpt_neox_attention(
        qkv, cos, sin, mask, pk, pv, num_heads=heads, head_size=head, scale=scale))
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


def to_contrib_domain(model, op_type: str | None = None):
    """A copy of an ONNX model whose plugin nodes are in onnxruntime-extensions' domain (renamed to `op_type`
    when given, to run them with another registered implementation)."""
    import onnx

    from neoxrt.export.neox_onnx import PLUGIN_DOMAIN

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain == PLUGIN_DOMAIN:
            node.domain = CONTRIB_DOMAIN
            node.op_type = op_type or node.op_type
    for opset in model.opset_import:
        if opset.domain == PLUGIN_DOMAIN:
            opset.domain = CONTRIB_DOMAIN
    return model
