"""`onnx_from_weights` / `onnx_from_model`: the GPT-NeoX decoder graph, emitted op by op from a checkpoint's
weights (lazy: the graph holds shapes, `export.external_data` streams the bytes) or a `NeoX` module's.

The graph mirrors `neoxrt.model.neox` line for line, so that ONNX Runtime reproduces the PyTorch model to
fp32 rounding, and it keeps one contract for the prompt step and every decode step (past_sequence may be 0).

    input_ids --Gather(embed)--> x [B,S,Hd] (fp32 residual stream)
    position_ids --> cos/sin [B,S,R]        attention_mask + shapes --> allowed [B,1,S,T]
    per layer i:  LN -> qkv MatMul -> [B,H,S,3D] -> q,k,v -> attention flavour -> dense -+
                  LN -> MLP ------------------------------------------------------------+-> x  (hidden_states.i)
    x --LN--> lm_head MatMul --> logits [B,S,V] (fp32)

The fused flavour (except with the static cache) packs the qkv projection's output features as [q | k | v]
(all heads of q, then of k, then of v) instead of the checkpoint's per-head [q_h, k_h, v_h]: the initializer
keeps its checkpoint name with its columns permuted, so that one Split gives q, k, v as [B,S,Hd] and
RotaryEmbedding and Attention take them 3-D (num_heads attributes) -- no Reshape/Transpose around attention,
four fewer nodes a layer (14m INT8 weights-only decode faster, docs/benchmarks.md). `tensorrt_ready` puts
the 4-D form back for TensorRT, whose parser takes 4-D Attention only.

The heads (`ExportOptions.task`, see `neoxrt.model.heads`) share the trunk without a KV cache; positions come
from the mask (real tokens counted) and the tail is the head's:

    attention_mask --Cast fp32, CumSum, -1, Max 0, Cast int64--> positions [B,S]
    text-classification:  the last layer's attention output and x --Gather(last real token)--> [B,Hd], its
                          output projection and MLP on that row only --LN--> score MatMul --> logits [B,L]
    token-classification: x --LN--> classifier MatMul+bias --> logits [B,S,L]
    question-answering:   x --LN--> qa_outputs MatMul+bias [B,S,2] --Gather 0 / 1, Squeeze--> start_logits, end_logits [B,S]
    feature-extraction:   x --LN--> last_hidden_state [B,S,Hd]

fp16: weights, KV cache and matmuls in fp16; LayerNorm, the residual stream, rotary tables and attention
scores/softmax in fp32 (Pythia overflows fp16 in attention scores and LayerNorm).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from neoxrt import contract as io
from neoxrt.contract import TensorSpec
from neoxrt.export.graph import GraphBuilder
from neoxrt.export.options import ExportOptions
from neoxrt.export.screen import screen_constants, screened_logits
from neoxrt.model.config import NeoXConfig
from neoxrt.model.heads import NeoXHead
from neoxrt.model.hf_names import hf_key
from neoxrt.model.neox import NeoX, rope_inv_freq
from neoxrt.model.task import HEAD_LAYERS, HeadConfig

PLUGIN_DOMAIN = "neoxrt"
PLUGIN_OP = "GptNeoxAttention"
PLUGIN_VERSION = "1"
F32_MIN = float(np.finfo(np.float32).min)
FP16_MASK = -30000.0  # additive mask for fp16 fused attention: exp() is 0, s + mask cannot overflow
# our activation names -> ONNX Gelu-20's `approximate` (gelu_fast is the tanh form written another way)
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
GELU_OPSET = 20


def packed_order(num_heads: int, head_dim: int) -> np.ndarray:
    """The qkv projection's rows (output features) in [q | k | v] order: packed row j is checkpoint row
    order[j] (checkpoint rows are per head: q_h, k_h, v_h, head_dim each)."""
    return np.arange(3 * num_heads * head_dim).reshape(num_heads, 3, head_dim).transpose(1, 0, 2).reshape(-1)


def take_rows(weight, order: np.ndarray):
    """`weight`'s first-axis entries in `order`: recorded on a lazy checkpoint tensor, applied to an array."""
    return weight.take_rows(order) if hasattr(weight, "take_rows") else np.asarray(weight)[order]


def hidden_state_name(layer: int) -> str:
    """Name of layer `layer`'s output (residual stream); the report marks these to localise errors."""
    return f"hidden_states.{layer}"


class _Emitter:
    """`state`: our key -> weight (numpy, or lazy with `.T` / `.astype` / `shape`)."""

    def __init__(self, config: NeoXConfig, state: dict, options: ExportOptions, head: HeadConfig):
        self.cfg = config
        self.opt = options
        self.head = head
        self.lm = head.task == io.TEXT_GENERATION
        self.positions = io.POSITION_IDS  # a graph input for the LM, computed from the mask for the heads
        self.fp16 = options.dtype == "fp16"
        self.wdt = np.float16 if self.fp16 else np.float32
        self.state = state
        self.inv_freq = rope_inv_freq(self.cfg).numpy()
        self.g = GraphBuilder()

    # -- helpers -------------------------------------------------------------------------------------
    def to_compute(self, x: str) -> str:
        """fp32 residual value -> matmul dtype."""
        return self.g.op("Cast", [x], to=onnx.TensorProto.FLOAT16) if self.fp16 else x

    def to_f32(self, x: str) -> str:
        return self.g.op("Cast", [x], to=onnx.TensorProto.FLOAT) if self.fp16 else x

    def linear(self, x: str, key: str, out: str | None = None, order: np.ndarray | None = None) -> str:
        """x @ W^T + b, W stored transposed [in, out] under its checkpoint name; `order`: the output features
        in that order (W's rows and b permuted)."""
        g = self.g
        w, b = self.state[f"{key}.weight"], self.state.get(f"{key}.bias")
        if order is not None:
            w, b = take_rows(w, order), None if b is None else take_rows(b, order)
        y = g.op("MatMul", [x, g.weight(hf_key(f"{key}.weight"), w.T.astype(self.wdt))])
        if b is not None:
            y = g.op("Add", [y, g.weight(hf_key(f"{key}.bias"), b.astype(self.wdt))], [out] if out else 1)
        return y

    @property
    def packed_qkv(self) -> bool:
        """qkv output features as [q | k | v] (fused attention on 3-D q, k, v); the static cache keeps the
        checkpoint's per-head order for its 4-D TensorScatter."""
        return self.opt.attention == "fused" and not (self.lm and self.opt.kv_cache == "static")

    def layer_norm(self, x: str, key: str) -> str:
        g = self.g
        w = g.weight(hf_key(f"{key}.weight"), self.state[f"{key}.weight"].astype(np.float32))
        b = g.weight(hf_key(f"{key}.bias"), self.state[f"{key}.bias"].astype(np.float32))
        return g.op("LayerNormalization", [x, w, b], axis=-1, epsilon=self.cfg.layer_norm_eps)

    def activation(self, x: str) -> str:
        g, act, dt = self.g, self.cfg.hidden_act, self.wdt
        if act == "relu":
            return g.op("Relu", [x])
        if act == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x])])
        if act in GELU_APPROXIMATE and self.opt.opset >= GELU_OPSET:  # one node, with kernels in ORT and TensorRT
            return g.op("Gelu", [x], approximate=GELU_APPROXIMATE[act])
        # older opsets: the formula, op by op
        half_x = g.op("Mul", [x, g.const(0.5, dt)])
        if act == "gelu":
            inner = g.op("Erf", [g.op("Mul", [x, g.const(1 / math.sqrt(2.0), dt)])])
        elif act == "gelu_fast":  # 0.5x(1 + tanh(x * 0.7978845608 * (1 + 0.044715 x^2)))
            poly = g.op("Add", [g.const(1.0, dt), g.op("Mul", [g.const(0.044715, dt), g.op("Mul", [x, x])])])
            inner = g.op("Tanh", [g.op("Mul", [g.op("Mul", [x, g.const(0.7978845608, dt)]), poly])])
        else:  # gelu_new, gelu_pytorch_tanh: 0.5x(1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cube = g.op("Pow", [x, g.const(3.0, dt)])
            poly = g.op("Add", [x, g.op("Mul", [g.const(0.044715, dt), cube])])
            inner = g.op("Tanh", [g.op("Mul", [g.const(math.sqrt(2.0 / math.pi), dt), poly])])
        return g.op("Mul", [half_x, g.op("Add", [g.const(1.0, dt), inner])])

    # -- shared subgraphs ------------------------------------------------------------------------------
    def allowed_mask(self) -> str:
        """Boolean [B,1,S,T]: key j visible from query i iff j <= P+i and attention_mask[b,j]."""
        g = self.g
        g.scope = "/mask"
        total = g.op("Gather", [g.op("Shape", [io.ATTENTION_MASK]), g.const(1)], axis=0)  # T (scalar)
        seq = g.op("Gather", [g.op("Shape", [io.INPUT_IDS]), g.const(1)], axis=0)  # S (scalar)
        past = g.op("Sub", [total, seq])  # P
        key_pos = g.op("Range", [g.const(0), total, g.const(1)])  # [T]
        query_pos = g.op("Range", [past, total, g.const(1)])  # [S]
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_pos, g.const([0])]),
                                      g.op("Unsqueeze", [query_pos, g.const([1])])])  # [S, T]
        pad = g.op("Unsqueeze", [g.op("Cast", [io.ATTENTION_MASK], to=onnx.TensorProto.BOOL), g.const([1, 2])])  # [B,1,1,T]
        return g.op("And", [causal, pad])  # [B,1,S,T]

    def static_allowed_mask(self) -> str:
        """Boolean [B,1,S,C] over cache slots: slot j visible from query s iff j <= write_indices[b] + s and
        attention_mask[b, j] (padding and unwritten slots are 0)."""
        g = self.g
        g.scope = "/mask"
        slots = g.op("Gather", [g.op("Shape", [io.ATTENTION_MASK]), g.const(1)], axis=0)  # C (scalar)
        seq = g.op("Gather", [g.op("Shape", [io.INPUT_IDS]), g.const(1)], axis=0)  # S (scalar)
        key_slot = g.op("Unsqueeze", [g.op("Range", [g.const(0), slots, g.const(1)]), g.const([0, 1])])  # [1,1,C]
        query_slot = g.op("Add", [g.op("Unsqueeze", [io.WRITE_INDICES, g.const([1])]),
                                  g.op("Unsqueeze", [g.op("Range", [g.const(0), seq, g.const(1)]), g.const([0])])])
        causal = g.op("LessOrEqual", [key_slot, g.op("Unsqueeze", [query_slot, g.const([2])])])  # [B,S,C]
        pad = g.op("Unsqueeze", [g.op("Cast", [io.ATTENTION_MASK], to=onnx.TensorProto.BOOL), g.const([1, 2])])
        return g.op("And", [g.op("Unsqueeze", [causal, g.const([1])]), pad])  # [B,1,S,C]

    def rope_angles(self) -> tuple[str, str]:
        """cos, sin [B,S,R] in fp32 from position_ids (as rope_cos_sin in the model)."""
        g = self.g
        g.scope = "/rotary"
        pos = g.op("Unsqueeze", [g.op("Cast", [self.positions], to=onnx.TensorProto.FLOAT), g.const([2])])  # [B,S,1]
        freqs = g.op("Mul", [pos, g.weight("rotary.inv_freq", self.inv_freq.astype(np.float32))])  # [B,S,R/2]
        emb = g.op("Concat", [freqs, freqs], axis=-1)  # [B,S,R]
        return g.op("Cos", [emb]), g.op("Sin", [emb])

    def rope_caches(self) -> tuple[str, str]:
        """cos/sin tables [max_positions, R/2] for RotaryEmbedding-23."""
        positions = np.arange(self.cfg.max_position_embeddings, dtype=np.float32)[:, None]
        freqs = (positions * self.inv_freq[None, :].astype(np.float32)).astype(np.float32)
        cos = self.g.weight("rotary.cos_cache", np.cos(freqs).astype(self.wdt))
        sin = self.g.weight("rotary.sin_cache", np.sin(freqs).astype(self.wdt))
        return cos, sin

    def apply_rope(self, x: str, cos4: str, sin4: str) -> str:
        """Rotate the first R channels of x [B,H,S,D] (rotate-half layout)."""
        g, r, d = self.g, self.cfg.rotary_dim, self.cfg.head_dim
        x_rot = g.op("Slice", [x, g.const([0]), g.const([r]), g.const([3])])
        x1 = g.op("Slice", [x_rot, g.const([0]), g.const([r // 2]), g.const([3])])
        x2 = g.op("Slice", [x_rot, g.const([r // 2]), g.const([r]), g.const([3])])
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
        y = g.op("Add", [g.op("Mul", [x_rot, cos4]), g.op("Mul", [rotated, sin4])])
        if r == d:
            return y
        x_pass = g.op("Slice", [x, g.const([r]), g.const([d]), g.const([3])])
        return g.op("Concat", [y, x_pass], axis=3)

    # -- attention flavours: each takes the fused qkv [B,S,3Hd], returns [B,S,Hd] ---------------------
    def split_heads(self, qkv: str) -> list[str]:
        g, cfg = self.g, self.cfg
        heads = g.op("Reshape", [qkv, g.const([0, 0, cfg.num_heads, 3 * cfg.head_dim])])  # [B,S,H,3D]
        heads = g.op("Transpose", [heads], perm=[0, 2, 1, 3])  # [B,H,S,3D]
        return g.op("Split", [heads, g.const([cfg.head_dim] * 3)], 3, axis=3)  # q, k, v [B,H,S,D]

    def merge_heads(self, y: str) -> str:
        y = self.g.op("Transpose", [y], perm=[0, 2, 1, 3])  # [B,S,H,D]
        return self.g.op("Reshape", [y, self.g.const([0, 0, self.cfg.hidden_size])])  # [B,S,Hd]

    def attn_decomposed(self, i: int, qkv: str, shared: dict) -> str:
        g, cfg = self.g, self.cfg
        q, k, v = self.split_heads(qkv)
        q, k = self.apply_rope(q, shared["cos4"], shared["sin4"]), self.apply_rope(k, shared["cos4"], shared["sin4"])
        k_all, v_all = k, v  # the heads: no cache
        if self.lm:
            k_all = g.op("Concat", [io.past_key(i), k], [io.present_key(i)], axis=2)  # [B,H,T,D]
            v_all = g.op("Concat", [io.past_value(i), v], [io.present_value(i)], axis=2)
        kt = g.op("Transpose", [self.to_f32(k_all)], perm=[0, 1, 3, 2])  # [B,H,D,T]
        scores = g.op("Mul", [g.op("MatMul", [self.to_f32(q), kt]), g.const(cfg.head_dim**-0.5, "float32")])
        scores = g.op("Where", [shared["allowed"], scores, g.const(F32_MIN, "float32")])  # [B,H,S,T]
        probs = g.op("Softmax", [scores], axis=-1)
        if self.fp16:
            probs = g.op("Cast", [probs], to=onnx.TensorProto.FLOAT16)
        return self.merge_heads(g.op("MatMul", [probs, v_all]))

    def attn_fused(self, i: int, qkv: str, shared: dict) -> str:
        g, cfg = self.g, self.cfg
        cos, sin = shared["cos_cache"], shared["sin_cache"]
        if not self.packed_qkv:  # static cache: write k, v [B,H,S,D] into their slots (in place when past and
            # present share a buffer), attend over all slots; the mask hides padding and slots not written yet
            q, k, v = self.split_heads(qkv)
            q = g.op("RotaryEmbedding", [q, cos, sin, self.positions], rotary_embedding_dim=cfg.rotary_dim)
            k = g.op("RotaryEmbedding", [k, cos, sin, self.positions], rotary_embedding_dim=cfg.rotary_dim)
            k_all = g.op("TensorScatter", [io.past_key(i), k, io.WRITE_INDICES], [io.present_key(i)], axis=-2)
            v_all = g.op("TensorScatter", [io.past_value(i), v, io.WRITE_INDICES], [io.present_value(i)], axis=-2)
            return self.merge_heads(g.op("Attention", [q, k_all, v_all, shared["bias"]], scale=cfg.head_dim**-0.5))
        q, k, v = g.op("Split", [qkv, g.const([cfg.hidden_size] * 3)], 3, axis=2)  # [B,S,Hd] each
        rotary = {"rotary_embedding_dim": cfg.rotary_dim, "num_heads": cfg.num_heads}
        q = g.op("RotaryEmbedding", [q, cos, sin, self.positions], **rotary)
        k = g.op("RotaryEmbedding", [k, cos, sin, self.positions], **rotary)
        heads = {"q_num_heads": cfg.num_heads, "kv_num_heads": cfg.num_heads, "scale": cfg.head_dim**-0.5}
        if not self.lm:  # no cache: attend over this pass's keys
            return g.op("Attention", [q, k, v, shared["bias"]], **heads)
        return g.op("Attention", [q, k, v, shared["bias"], io.past_key(i), io.past_value(i)],
                    [g._unique(f"/layers.{i}/attention/Y"), io.present_key(i), io.present_value(i)], **heads)[0]

    def attn_plugin(self, i: int, qkv: str, shared: dict) -> str:
        cfg = self.cfg
        return self.g.op(
            PLUGIN_OP, [qkv, shared["cos"], shared["sin"], shared["mask_i32"], io.past_key(i), io.past_value(i)],
            [self.g._unique(f"/layers.{i}/attention/out"), io.present_key(i), io.present_value(i)],
            domain=PLUGIN_DOMAIN, num_heads=cfg.num_heads, head_size=cfg.head_dim, rotary_dim=cfg.rotary_dim,
            scale=cfg.head_dim**-0.5, plugin_namespace=PLUGIN_DOMAIN, plugin_version=PLUGIN_VERSION,
            aot=1,  # TensorRT's parser: use the plugin's ahead-of-time (Triton PTX) implementation
        )[0]

    def mask_positions(self) -> str:
        """[B,S] int64 positions counting real tokens: cumsum(attention_mask) - 1, padding clamped to 0. The sum
        runs in fp32 (exact below 2^24 tokens): TensorRT's CumSum takes float types only."""
        g = self.g
        g.scope = "/positions"
        count = g.op("CumSum", [g.op("Cast", [io.ATTENTION_MASK], to=onnx.TensorProto.FLOAT), g.const(1)])
        position = g.op("Max", [g.op("Sub", [count, g.const(1.0, "float32")]), g.const(0.0, "float32")])
        return g.op("Cast", [position], to=onnx.TensorProto.INT64)

    def shared_inputs(self) -> dict:
        g, flavour = self.g, self.opt.attention
        if not self.lm:
            self.positions = self.mask_positions()
        if flavour == "decomposed":
            cos, sin = self.rope_angles()
            cos4 = g.op("Unsqueeze", [cos, g.const([1])])  # [B,1,S,R]
            sin4 = g.op("Unsqueeze", [sin, g.const([1])])
            if self.fp16:
                cos4 = g.op("Cast", [cos4], to=onnx.TensorProto.FLOAT16)
                sin4 = g.op("Cast", [sin4], to=onnx.TensorProto.FLOAT16)
            return {"cos4": cos4, "sin4": sin4, "allowed": self.allowed_mask()}
        if flavour == "fused":
            cos_cache, sin_cache = self.rope_caches()
            allowed = self.static_allowed_mask() if self.opt.kv_cache == "static" else self.allowed_mask()
            fill = FP16_MASK if self.fp16 else F32_MIN
            dt = self.wdt
            bias = g.op("Where", [allowed, g.const(0.0, dt), g.const(fill, dt)])  # additive [B,1,S,T]
            return {"cos_cache": cos_cache, "sin_cache": sin_cache, "bias": bias}
        cos, sin = self.rope_angles()
        g.scope = "/mask"
        mask_i32 = g.op("Cast", [io.ATTENTION_MASK], to=onnx.TensorProto.INT32)
        self.g.domains[PLUGIN_DOMAIN] = 1
        return {"cos": cos, "sin": sin, "mask_i32": mask_i32}

    # -- the whole graph --------------------------------------------------------------------------------
    def emit(self) -> onnx.ModelProto:
        g, cfg = self.g, self.cfg
        attend = {"decomposed": self.attn_decomposed, "fused": self.attn_fused, "plugin": self.attn_plugin}[self.opt.attention]
        shared = self.shared_inputs()
        g.scope = "/embed"
        embed = g.weight(hf_key("embed.weight"), self.state["embed.weight"].astype(self.wdt))
        x = self.to_f32(g.op("Gather", [embed, io.INPUT_IDS], axis=0))  # [B,S,Hd] fp32
        pooled = self.last_real_rows() if self.head.task == io.TEXT_CLASSIFICATION else None
        for i in range(cfg.num_layers):
            g.scope = f"/layers.{i}/attention"
            qkv = self.linear(self.to_compute(self.layer_norm(x, f"layers.{i}.ln_attn")), f"layers.{i}.qkv",
                              order=packed_order(cfg.num_heads, cfg.head_dim) if self.packed_qkv else None)
            y = attend(i, qkv, shared)
            if pooled is not None and i == cfg.num_layers - 1:
                # sequence classification reads one position of the last layer: its keys and values need every
                # position, but the attention output projection, the residual and the MLP only the pooled one
                y, x = self.gather_rows(y, pooled), self.gather_rows(x, pooled)  # [B,Hd]
            attn = self.to_f32(self.linear(y, f"layers.{i}.attn_out"))
            g.scope = f"/layers.{i}/mlp"
            if cfg.use_parallel_residual:
                h = self.to_compute(self.layer_norm(x, f"layers.{i}.ln_mlp"))
                mlp = self.to_f32(self.linear(self.activation(self.linear(h, f"layers.{i}.mlp_in")), f"layers.{i}.mlp_out"))
                x = g.op("Add", [g.op("Add", [x, attn]), mlp], [hidden_state_name(i)])
            else:
                x = g.op("Add", [x, attn])
                h = self.to_compute(self.layer_norm(x, f"layers.{i}.ln_mlp"))
                mlp = self.to_f32(self.linear(self.activation(self.linear(h, f"layers.{i}.mlp_in")), f"layers.{i}.mlp_out"))
                x = g.op("Add", [x, mlp], [hidden_state_name(i)])
        if not self.lm:
            return self.emit_head(x)
        g.scope = "/lm_head"
        if self.opt.logits == "last":  # [B,1,Hd]: the last position (left padding keeps real tokens last)
            x = g.op("Slice", [x, g.const([-1]), g.const([2**62]), g.const([1])])
        elif self.opt.keeps_logits:  # [B,K,Hd]: the last logits_to_keep positions (its default 0: all)
            g.weight(io.LOGITS_TO_KEEP, np.zeros(1, np.int64))
            x = g.op("Slice", [x, g.op("Neg", [io.LOGITS_TO_KEEP]), g.const([2**62]), g.const([1])])
        h = self.to_compute(self.layer_norm(x, "ln_f"))
        if self.opt.lm_head == "screened":  # fp32 only (ExportOptions)
            head = self.state["embed.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
            rows = embed if cfg.tie_word_embeddings else g.weight(hf_key("lm_head.weight"), head.astype(np.float32))
            screened_logits(g, h, rows, screen_constants(head), io.LOGITS, self.opt.opset)  # [V, Hd] rows
        else:
            if cfg.tie_word_embeddings:
                w = g.op("Transpose", [embed], perm=[1, 0])
            else:
                w = g.weight(hf_key("lm_head.weight"), self.state["lm_head.weight"].T.astype(self.wdt))
            logits = g.op("MatMul", [h, w])
            if self.fp16:
                g.op("Cast", [logits], [io.LOGITS], to=onnx.TensorProto.FLOAT)
            else:
                g.op("Identity", [logits], [io.LOGITS])
        inputs, outputs = io.io_spec(cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.vocab_size,
                                     "float16" if self.fp16 else "float32", self.opt.logits, self.opt.kv_cache)
        if self.opt.keeps_logits:
            inputs = inputs + [TensorSpec(io.LOGITS_TO_KEEP, "int64", (1,))]  # with its initializer: overridable
            outputs = [TensorSpec(io.LOGITS, "float32", (io.BATCH, "logits_sequence", cfg.vocab_size))] + outputs[1:]
        return g.make_model("neoxrt_gpt_neox", inputs, outputs, self.opt.opset,
                            doc=f"GPT-NeoX decoder, {self.opt.dtype}, attention={self.opt.attention}, "
                                f"lm_head={self.opt.lm_head}")

    def last_real_rows(self) -> str:
        """[B] int64: each row's last real token as a row of [B*S, ...], b*S + argmax(index * mask) (index 0
        when only the first token is real)."""
        g = self.g
        g.scope = "/pool"
        seq = g.op("Gather", [g.op("Shape", [io.INPUT_IDS]), g.const(1)], axis=0)  # S
        batch = g.op("Gather", [g.op("Shape", [io.INPUT_IDS]), g.const(0)], axis=0)  # B
        index = g.op("Mul", [io.ATTENTION_MASK, g.op("Range", [g.const(0), seq, g.const(1)])])  # [B,S]
        last = g.op("ArgMax", [g.op("Cast", [index], to=onnx.TensorProto.FLOAT)], axis=1, keepdims=0)  # [B]
        return g.op("Add", [last, g.op("Mul", [g.op("Range", [g.const(0), batch, g.const(1)]), seq])])  # [B]

    def gather_rows(self, x: str, rows: str) -> str:
        """x [B,S,Hd] -> [B,Hd] at `rows` (last_real_rows), gathered from x flattened to [B*S, Hd]."""
        flat = self.g.op("Reshape", [x, self.g.const([-1, self.cfg.hidden_size])])
        return self.g.op("Gather", [flat, rows], axis=0)

    def emit_head(self, x: str) -> onnx.ModelProto:
        """The head's tail over the final residual stream x [B,S,Hd] (see the module docstring)."""
        g, task = self.g, self.head.task  # text-classification: x is pooled already ([B,Hd], in the last layer)
        g.scope = "/head"
        h = self.layer_norm(x, "ln_f")
        if task == io.FEATURE_EXTRACTION:
            g.op("Identity", [h], [io.LAST_HIDDEN_STATE])
        else:
            y = self.to_f32(self.linear(self.to_compute(h), HEAD_LAYERS[task][0]))
            if task == io.QUESTION_ANSWERING:  # [B,S,2] -> start, end [B,S]
                for column, name in enumerate((io.START_LOGITS, io.END_LOGITS)):
                    g.op("Squeeze", [g.op("Gather", [y, g.const([column])], axis=2), g.const([2])], [name])
            else:
                g.op("Identity", [y], [io.LOGITS])
        inputs, outputs = io.head_io_spec(task, self.cfg.hidden_size, self.head.output_width())
        return g.make_model(f"neoxrt_gpt_neox_{task.replace('-', '_')}", inputs, outputs, self.opt.opset,
                            doc=f"GPT-NeoX {task}, {self.opt.dtype}, attention={self.opt.attention}")


def onnx_from_weights(config: NeoXConfig, weights: dict, options: ExportOptions,
                      head: HeadConfig | None = None) -> tuple[onnx.ModelProto, dict]:
    """The graph for `config` under `options` (the decoder, or `head`'s graph), and {initializer name: lazy
    weight} still to be written.

    Args:
        weights: our key -> numpy array or lazy array (`neoxrt.model.weights.open_checkpoint`).
        head: the head and its labels; default: the causal LM (or a head of `options.task` with two labels).
    """
    head = head or HeadConfig(task=options.task or io.TEXT_GENERATION)
    emitter = _Emitter(config, weights, options, head)
    return emitter.emit(), emitter.g.lazy


def onnx_from_model(model: NeoX | NeoXHead, options: ExportOptions) -> onnx.ModelProto:
    """The graph for `model` (a `NeoX`, or a `NeoXHead` whose head wins over `options.task`) under `options`
    (weights embedded as initializers)."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    head = getattr(model, "head", None)
    if head is not None:
        options = options.for_task(head.task)
    return onnx_from_weights(model.config, state, options, head)[0]
