"""`ExportOptions`: what `neoxrt export` was asked for, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from neoxrt.contract import HEAD_TASKS, TASKS, TEXT_GENERATION
from neoxrt.errors import ExportError

DTYPES = ("fp32", "fp16")
ATTENTIONS = ("decomposed", "fused", "plugin")
LOGITS = ("all", "last")
KV_CACHES = ("dynamic", "static")
LM_HEADS = ("exact", "screened")
# opsets we emit and test, per attention flavour; the first is the default
OPSETS = {"decomposed": (17, 18, 19, 20, 21, 22, 23), "fused": (23, 24), "plugin": (17, 18, 19, 20, 21, 22, 23)}
STATIC_OPSET = 24  # TensorScatter
TWO_GB = 2**31 - 1  # protobuf's limit on one message
INLINE_LIMIT = 256 << 20  # weights past this go to model.onnx.data, streamed (memory stays flat)


@dataclass(frozen=True)
class ExportOptions:
    """Args:
    dtype: fp32, or fp16 with the sensitive parts (LayerNorm, residual stream, attention scores) in fp32.
    attention: decomposed (MatMul/Softmax), fused (ONNX Attention + RotaryEmbedding, opset 23), or
        plugin (one custom node per layer, for our TensorRT plugin).
    opset: the ai.onnx opset; None takes the flavour's default.
    external_data_threshold: weight bytes past which weights go to model.onnx.data, streamed tensor by tensor
        (below it the weights stay inside model.onnx and are held in memory while it is written; at most 2 GB).
    logits: all (logits [B, S, V], optimum's contract) or last ([B, 1, V]: the prompt step skips the LM head
        for every position but the last -- what generation needs, a third of a 128-token prompt's work).
    kv_cache: dynamic (past [B,H,P,D] in, present [B,H,P+S,D] out: optimum's contract) or static (fixed
        slots updated in place with TensorScatter-24: no per-step cache copy, the serving scheduler's KV-cache
        pool; fused attention only). None (the default): static where it applies (the causal LM with fused
        attention at opset 24), dynamic otherwise (other flavours, heads, --opset 23).
    lm_head: exact, or screened (fp32 causal LM only): an INT8 copy of the LM head bounds every logit, and
        only the tokens that can still be the largest are recomputed from the fp32 weights (export/screen.py):
        the largest logit and greedy tokens are fp32's, the rest are within a proven bound; a quarter of the
        LM head's bytes read per token.
    """

    dtype: str = "fp32"
    attention: str = "fused"  # measured fastest on ONNX Runtime CPU (docs/benchmarks.md)
    opset: int | None = None
    external_data_threshold: int = INLINE_LIMIT
    logits: str = "all"
    kv_cache: str | None = None
    auto_kv_cache: bool = dataclasses.field(default=False, init=False)  # kv_cache was left to the default
    task: str | None = None
    lm_head: str = "exact"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            raise ExportError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        object.__setattr__(self, "auto_kv_cache", self.kv_cache is None)
        if self.kv_cache is None:
            static = self.attention == "fused" and self.task not in HEAD_TASKS and self.opset in (None, STATIC_OPSET)
            object.__setattr__(self, "kv_cache", "static" if static else "dynamic")
        if self.kv_cache not in KV_CACHES:
            raise ExportError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        allowed = OPSETS[self.attention]
        if self.kv_cache == "static":
            if self.attention != "fused":
                raise ExportError(f"--kv-cache static needs --attention fused, got --attention {self.attention}")
            allowed = (STATIC_OPSET,)
        if self.opset is None:
            object.__setattr__(self, "opset", allowed[0])
        elif self.opset not in allowed:
            raise ExportError(
                f"--attention {self.attention} needs opset in {allowed[0]}..{allowed[-1]}, got --opset {self.opset}"
            )
        if self.logits not in LOGITS:
            raise ExportError(f"--logits must be one of {', '.join(LOGITS)}, got {self.logits!r}")
        if self.task is not None and self.task not in TASKS:
            raise ExportError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.lm_head not in LM_HEADS:
            raise ExportError(f"--lm-head must be one of {', '.join(LM_HEADS)}, got {self.lm_head!r}")
        if self.lm_head == "screened" and (self.dtype != "fp32" or self.task in HEAD_TASKS):
            raise ExportError(f"--lm-head screened needs --dtype fp32 and the causal LM, got --dtype {self.dtype}"
                              f"{f' --task {self.task}' if self.task in HEAD_TASKS else ''}")
        if self.task in HEAD_TASKS:
            self._check_head()
        if not 0 <= self.external_data_threshold <= TWO_GB:
            raise ExportError(f"--external-data-threshold must be in [0, {TWO_GB}] bytes (protobuf's limit), "
                              f"got {self.external_data_threshold}")

    def _check_head(self) -> None:
        """A head graph has no KV cache and no separate last-position logits."""
        for flag, value, default in (("--attention", self.attention, "plugin"), ("--kv-cache", self.kv_cache, "static"),
                                     ("--logits", self.logits, "last")):
            if value == default:
                raise ExportError(f"--task {self.task}: {flag} {value} applies to {TEXT_GENERATION} only")

    @property
    def keeps_logits(self) -> bool:
        """Whether the causal LM graph takes logits_to_keep: a static cache with every position's logits."""
        return self.logits == "all" and self.kv_cache == "static"

    def for_task(self, task: str) -> ExportOptions:
        """These options for `task` (the one a checkpoint names); a defaulted kv_cache is chosen again for it."""
        return dataclasses.replace(self, task=task, kv_cache=None if self.auto_kv_cache else self.kv_cache)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "auto_kv_cache"}
