"""The Triton kernel behind neoxrt's TensorRT attention plugin (`neoxrt::GptNeoxAttention`, see
plugin_ref.py for the contract): partial rotary on q and the new k, causal + padding mask, online softmax
over the cache and the new tokens, and the cache update -- one kernel for prompt and decode steps.

    grid (B*H, S): one program per (batch row, head, query position)
      q  <- qkv[b, s, h]           rotate first R channels (rotate-half), scale
      for key blocks t < P+s+1:    k,v <- past[b,h,t] (t < P) | rotate(qkv[b, t-P, h]) (t >= P)
                                   online softmax of q.k over allowed keys (t <= P+s and mask[b,t])
                                   the last query's program also writes past rows into present (fused copy)
      present[b,h,P+s] <- rotated k, v of token s;  out[b, s, h*D:(h+1)*D] <- acc / l

Argument order is the TensorRT AOT plugin convention: input pointers, int32 scalars, output pointers,
then compile-time constants. `attention(...)` launches it on torch tensors (CUDA, or CPU under
TRITON_INTERPRET=1, which is how the tests check it against the numpy reference).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": a fully masked block never produces NaN


@triton.jit
def gpt_neox_attention_kernel(
    qkv_ptr, cos_ptr, sin_ptr, mask_ptr, past_k_ptr, past_v_ptr,
    S, P,
    out_ptr, present_k_ptr, present_v_ptr,
    H: tl.constexpr, D: tl.constexpr, R: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // H
    h = bh % H
    T = P + S
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    half = R // 2
    rot = d < R
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    row = 3 * H * D  # qkv row stride
    head = h * 3 * D

    # q of token s, rotated and scaled  [BLOCK_D]
    q_base = qkv_ptr + (b * S + s) * row + head
    q = tl.load(q_base + d, mask=d_ok, other=0.0).to(tl.float32)
    q_p = tl.load(q_base + partner, mask=d_ok & rot, other=0.0).to(tl.float32)
    cs = tl.load(cos_ptr + (b * S + s) * R + d, mask=rot, other=1.0).to(tl.float32)
    sn = tl.load(sin_ptr + (b * S + s) * R + d, mask=rot, other=0.0).to(tl.float32)
    q = tl.where(rot, q * cs + sign * q_p * sn, q) * SCALE

    m = tl.full([1], NEG, tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    cache = bh * T  # row offset of (b, h) in present [B,H,T,D]
    for start in range(0, P + s + 1, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        in_past = t < P
        is_new = (t >= P) & (t < T)
        tp = tl.where(is_new, t - P, 0)  # token index of a new key
        past_off = (bh * P + t)[:, None] * D + d[None, :]
        pm = in_past[:, None] & d_ok[None, :]
        k_past = tl.load(past_k_ptr + past_off, mask=pm, other=0.0).to(tl.float32)
        v_past = tl.load(past_v_ptr + past_off, mask=pm, other=0.0).to(tl.float32)
        new_base = (b * S + tp)[:, None] * row + head
        nm = is_new[:, None] & d_ok[None, :]
        k_raw = tl.load(qkv_ptr + new_base + D + d[None, :], mask=nm, other=0.0).to(tl.float32)
        k_par = tl.load(qkv_ptr + new_base + D + partner[None, :], mask=nm & rot[None, :], other=0.0).to(tl.float32)
        v_new = tl.load(qkv_ptr + new_base + 2 * D + d[None, :], mask=nm, other=0.0).to(tl.float32)
        rm = is_new[:, None] & rot[None, :]
        ck = tl.load(cos_ptr + (b * S + tp)[:, None] * R + d[None, :], mask=rm, other=1.0).to(tl.float32)
        sk = tl.load(sin_ptr + (b * S + tp)[:, None] * R + d[None, :], mask=rm, other=0.0).to(tl.float32)
        k_new = tl.where(rot[None, :], k_raw * ck + sign[None, :] * k_par * sk, k_raw)
        k = tl.where(in_past[:, None], k_past, k_new)
        v = tl.where(in_past[:, None], v_past, v_new)
        if s == S - 1:  # fused cache copy: past rows -> present, once
            dst = (cache + t)[:, None] * D + d[None, :]
            tl.store(present_k_ptr + dst, k_past.to(present_k_ptr.dtype.element_ty), mask=pm)
            tl.store(present_v_ptr + dst, v_past.to(present_v_ptr.dtype.element_ty), mask=pm)
        keep = tl.load(mask_ptr + b * T + t, mask=t < T, other=0)
        allowed = (t <= P + s) & (t < T) & (keep != 0)
        scores = tl.sum(k * q[None, :], axis=1)
        scores = tl.where(allowed, scores, NEG)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
        # this token's own k, v into present
        own = t == P + s
        dst = (cache + t)[:, None] * D + d[None, :]
        om = own[:, None] & d_ok[None, :]
        tl.store(present_k_ptr + dst, k_new.to(present_k_ptr.dtype.element_ty), mask=om)
        tl.store(present_v_ptr + dst, v_new.to(present_v_ptr.dtype.element_ty), mask=om)
    out = acc / l_sum
    tl.store(out_ptr + (b * S + s) * H * D + h * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def launch_config(head_size: int, block_n: int = 64) -> dict:
    """Compile-time block sizes for a head size (BLOCK_D: next power of two)."""
    return {"BLOCK_D": triton.next_power_of_2(head_size), "BLOCK_N": block_n}


def attention(qkv, cos, sin, mask, past_key, past_value, num_heads: int, head_size: int, rotary_dim: int,
              scale: float, block_n: int = 64):
    """Run the kernel on torch tensors; returns (out [B,S,H*D], present_key, present_value)."""
    import torch

    b, s, _ = qkv.shape
    p = past_key.shape[2]
    t = p + s
    out = torch.empty((b, s, num_heads * head_size), dtype=qkv.dtype, device=qkv.device)
    present_k = torch.empty((b, num_heads, t, head_size), dtype=past_key.dtype, device=qkv.device)
    present_v = torch.empty_like(present_k)
    args = [x.contiguous() for x in (qkv, cos, sin, mask, past_key, past_value)]
    gpt_neox_attention_kernel[(b * num_heads, s)](
        *args, s, p, out, present_k, present_v,
        H=num_heads, D=head_size, R=rotary_dim, SCALE=scale, **launch_config(head_size, block_n))
    return out, present_k, present_v


def kernel_signature(dtype: str, cache_dtype: str | None = None) -> dict:
    """Triton signature of the kernel for qkv/out in `dtype` ("fp16" | "fp32") and the cache in `cache_dtype`."""
    c = cache_dtype or dtype
    return {"qkv_ptr": f"*{dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "mask_ptr": "*i32",
            "past_k_ptr": f"*{c}", "past_v_ptr": f"*{c}", "S": "i32", "P": "i32",
            "out_ptr": f"*{dtype}", "present_k_ptr": f"*{c}", "present_v_ptr": f"*{c}",
            "H": "constexpr", "D": "constexpr", "R": "constexpr", "SCALE": "constexpr",
            "BLOCK_D": "constexpr", "BLOCK_N": "constexpr"}


def compile_ptx(dtype: str, num_heads: int, head_size: int, rotary_dim: int, scale: float, target=None,
                block_n: int = 64, ptx_isa: int | None = None) -> dict:
    """Ahead-of-time compile for TensorRT: {"name", "ptx", "num_warps", "shared", "global_scratch_size"}.

    Args:
        target: a triton GPUTarget or ("cuda", capability as 10 * major + minor); default: the current GPU.
            Capability 80 gives PTX that every Ampere-or-newer GPU JIT-compiles (hardware-compatible engines).
        ptx_isa: the newest PTX ISA (10 * major + minor) the driver that loads the engine accepts
            (neoxrt.tensorrt_api.driver_ptx_isa); the PTX's `.version` is capped to it. Without a cap Triton
            writes its own newest (Triton 3.9: 9.4 for sm_90a), which older drivers reject at the first launch.
    Raises:
        BuildError: the kernel needs scratch memory TensorRT cannot pass, or the PTX is newer than `ptx_isa`.

    Needs a process without TRITON_INTERPRET (the interpreter patches triton.language). Triton appends
    scratch-pointer parameters after ours; TensorRT does not pass them, which is valid only while both
    scratch sizes are 0 (checked).
    """
    import re

    from triton.backends.compiler import GPUTarget

    from neoxrt.errors import BuildError

    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    elif isinstance(target, tuple):
        target = GPUTarget(target[0], int(target[1]), 32)
    constants = {"H": num_heads, "D": head_size, "R": rotary_dim, "SCALE": scale, **launch_config(head_size, block_n)}
    src = triton.compiler.ASTSource(fn=gpt_neox_attention_kernel, signature=kernel_signature(dtype),
                                    constexprs=constants)
    kernel = triton.compile(src, target=target, options=None if ptx_isa is None else {"ptx_version": int(ptx_isa)})
    meta = kernel.metadata
    scratch = getattr(meta, "global_scratch_size", 0) or 0, getattr(meta, "profile_scratch_size", 0) or 0
    if any(scratch):
        raise BuildError(f"the attention kernel needs Triton scratch memory {scratch}; TensorRT cannot pass it")
    ptx = kernel.asm["ptx"]
    found = re.search(r"^\s*\.version (\d+)\.(\d+)", ptx, re.MULTILINE)
    version = 10 * int(found.group(1)) + int(found.group(2)) if found else None
    if ptx_isa is not None and (version is None or version > ptx_isa):
        raise BuildError(f"the attention kernel's PTX has .version {found.group(0).split()[-1] if found else '?'}; "
                         f"the driver accepts up to {ptx_isa // 10}.{ptx_isa % 10}")
    return {"name": meta.name, "ptx": ptx, "num_warps": meta.num_warps, "shared": meta.shared,
            "global_scratch_size": scratch[0], "ptx_isa": version}
