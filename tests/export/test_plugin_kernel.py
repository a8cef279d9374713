"""The Triton kernel of our TensorRT attention plugin against the numpy reference of the plugin contract
(itself checked against PyTorch through the plugin-flavour export, test_export_parity.py). On CPU it runs in
Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py); on a GPU machine the same tests run on CUDA.
Its ahead-of-time compile to PTX (what TensorRT embeds) runs on CPU too: Triton ships ptxas."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from neoxrt.export.plugin_kernel import attention
from neoxrt.export.plugin_ref import gpt_neox_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(rng, batch, seq, past, heads, head, rotary, dtype, pad=0):
    total = past + seq
    qkv = rng.normal(size=(batch, seq, 3 * heads * head)).astype(dtype)
    pos = np.arange(past, total)[None].repeat(batch, 0)
    inv = 1.0 / (10000 ** (np.arange(0, rotary, 2) / rotary))
    freqs = pos[..., None] * inv
    emb = np.concatenate([freqs, freqs], -1)
    mask = np.ones((batch, total), np.int32)
    mask[0, :pad] = 0  # left padding in row 0
    past_k = rng.normal(size=(batch, heads, past, head)).astype(dtype)
    past_v = rng.normal(size=(batch, heads, past, head)).astype(dtype)
    return qkv, np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32), mask, past_k, past_v


CASES = [  # batch, seq, past, heads, head, rotary, dtype, pad
    pytest.param(2, 7, 0, 2, 16, 4, np.float32, 0, id="prompt-partial-rotary"),
    pytest.param(3, 1, 40, 2, 16, 16, np.float32, 0, id="decode-full-rotary"),
    pytest.param(2, 3, 9, 3, 24, 8, np.float32, 5, id="chunked-prompt-left-padding"),
    pytest.param(2, 1, 70, 2, 32, 8, np.float16, 3, id="decode-fp16-padding-past-block-edge"),
    pytest.param(1, 5, 0, 4, 32, 8, np.float16, 0, id="prompt-fp16-pythia-14m-shape"),
]


@pytest.mark.parametrize("batch,seq,past,heads,head,rotary,dtype,pad", CASES)
def test_kernel_matches_the_plugin_reference(batch, seq, past, heads, head, rotary, dtype, pad):
    arrays = _inputs(np.random.default_rng(0), batch, seq, past, heads, head, rotary, dtype, pad)
    ref = gpt_neox_attention(*arrays, num_heads=heads, head_size=head, scale=head**-0.5)
    got = attention(*[torch.from_numpy(a).to(DEVICE) for a in arrays], heads, head, rotary, head**-0.5, block_n=16)
    got = [g.float().cpu().numpy() for g in got]
    mask = arrays[3]
    # query rows that see at least one key (a fully padded query row attends to nothing; its output is unused)
    seen = np.array([[mask[b, : past + s + 1].any() for s in range(seq)] for b in range(batch)])
    tol = 2e-3 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(got[0][seen], ref[0].astype(np.float32)[seen], atol=tol, rtol=tol)
    np.testing.assert_allclose(got[1], ref[1].astype(np.float32), atol=tol, rtol=tol)  # present_key (rotated)
    np.testing.assert_array_equal(got[2], ref[2].astype(np.float32))  # present_value: exact copy


def test_padding_changes_the_output_of_an_unpadded_row_not_at_all():
    rng = np.random.default_rng(1)
    arrays = list(_inputs(rng, 2, 4, 6, 2, 16, 8, np.float32, pad=0))
    base = attention(*[torch.from_numpy(a) for a in arrays], 2, 16, 8, 0.25, block_n=16)[0].numpy()
    arrays[3] = arrays[3].copy()
    arrays[3][0, :3] = 0  # pad row 0 only
    padded = attention(*[torch.from_numpy(a) for a in arrays], 2, 16, 8, 0.25, block_n=16)[0].numpy()
    np.testing.assert_array_equal(padded[1], base[1])
    assert np.abs(padded[0] - base[0]).max() > 1e-3  # and row 0 does see the padding


AOT = """
import json, triton
from triton.backends.compiler import GPUTarget
from neoxrt.export.plugin_kernel import compile_ptx
out = {}
for dtype in ("fp16", "fp32"):
    k = compile_ptx(dtype, 12, 64, 16, 0.125, GPUTarget("cuda", 90, 32))
    entry = k["ptx"][k["ptx"].index(".entry"):]
    out[dtype] = {"name": k["name"], "warps": k["num_warps"], "params": entry[:entry.index(")")].count(".param"),
                  "scratch": k["global_scratch_size"]}
print(json.dumps(out))
"""


def test_ahead_of_time_compile_gives_the_ptx_tensorrt_embeds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", AOT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for dtype, k in out.items():
        assert k["name"] == "gpt_neox_attention_kernel", dtype
        assert k["scratch"] == 0
        # our 11 arguments (6 input pointers, S and P, 3 output pointers) come first; Triton's 2 scratch
        # pointers follow and stay unused (scratch size 0), so TensorRT's launch with our 11 is valid
        assert k["params"] == 13, k


TRITON_OP = "GptNeoxAttentionTriton"


def _triton(qkv, cos, sin, mask, past_key, past_value, heads, head, rotary, scale):
    out = attention(*[torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE) for a in (qkv, cos, sin, mask, past_key, past_value)],
                    heads, head, rotary, scale, block_n=16)
    return tuple(o.cpu().numpy() for o in out)


def _triton_session(proto):
    """The plugin-flavour graph on ONNX Runtime with the Triton kernel as the plugin node's implementation."""
    import onnxruntime as ort

    from neoxrt.export.plugin_ref import onnxruntime_session_options, register_contrib_op, to_contrib_domain

    register_contrib_op(TRITON_OP, _triton)
    model = to_contrib_domain(proto, TRITON_OP)
    return ort.InferenceSession(model.SerializeToString(), onnxruntime_session_options(), providers=["CPUExecutionProvider"])


def test_the_kernel_inside_the_exported_graph_matches_pytorch():
    """Prompt and decode steps of the trained model, left-padded batch: logits from the plugin-flavour graph
    running our Triton kernel against the PyTorch model."""
    from neox_testing import PROMPTS, default_checkpoint, step_pairs
    from neoxrt.export.neox_onnx import onnx_from_model
    from neoxrt.export.options import ExportOptions
    from neoxrt.model import load_model

    model = load_model(default_checkpoint())
    session = _triton_session(onnx_from_model(model, ExportOptions(attention="plugin")))
    for step, mask, ours, ref, _, _ in step_pairs(session, model, PROMPTS, decode_steps=4):
        valid = mask.numpy().astype(bool)[:, -ours.shape[1]:]
        err = np.abs(ours - ref)[valid].max()
        assert err < 1e-4, (step, err)
