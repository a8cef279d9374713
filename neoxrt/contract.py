"""The I/O contract shared by export, build and runtime: tensor names, axis names and file names.

Names follow optimum's ONNX decoders (`add_past_key_values`), so ORTModelForCausalLM and other tools run
our exports unchanged. One graph serves the prompt step (past_sequence = 0) and every decode step.

The static KV cache variant (`--kv-cache static`) keeps the cache in fixed slots: past and present are both
[B, H, cache_sequence, D] (the runtime binds them to one buffer, updated in place by TensorScatter),
`attention_mask` covers the slots, and `write_indices` [B] says where this step's tokens go.
"""

from __future__ import annotations

from dataclasses import dataclass

# axis names (dynamic dimensions)
BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"  # = past_sequence + sequence
CACHE_SEQUENCE = "cache_sequence"  # static KV cache: slots allocated for the whole generation

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
START_LOGITS = "start_logits"  # question answering (optimum's names)
END_LOGITS = "end_logits"
LAST_HIDDEN_STATE = "last_hidden_state"  # feature extraction
LOGITS_TO_KEEP = "logits_to_keep"  # static-cache causal LM, --logits all: [1] int64, an input with a default (0:
# every position; K: the last K positions only), as transformers' logits_to_keep; not in io_spec (an overridable
# initializer: callers of the plain contract never see it)
WRITE_INDICES = "write_indices"  # static KV cache: the slot each row's new tokens are written at

# the largest count or length any option or request field takes (int32, as Triton's request fields): larger ones
# are refused by name instead of overflowing a C long inside numpy
MAX_COUNT = 2**31 - 1
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"  # the checkpoint's generation defaults, carried along
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # special tokens and, for chat models, the chat template
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 saves the chat template here
# copied from stage to stage where the checkpoint has them
COMPANION_FILES = (TOKENIZER_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE)


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


# optimum's task names: the causal LM, and the heads (no KV cache; inputs input_ids + attention_mask only)
TEXT_GENERATION = "text-generation"
TEXT_CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
FEATURE_EXTRACTION = "feature-extraction"
TASKS = (TEXT_GENERATION, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING, FEATURE_EXTRACTION)
HEAD_TASKS = TASKS[1:]
NUM_LABELS = "num_labels"  # a head's output width (a fixed dimension, named here for messages only)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type name (numpy spelling) and axes (names or ints)."""

    name: str
    dtype: str
    shape: tuple

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


def io_spec(num_layers: int, num_heads: int, head_dim: int, vocab_size: int, kv_dtype: str,
            logits: str = "all", kv_cache: str = "dynamic") -> tuple[list, list]:
    """(inputs, outputs) of the decoder contract; logits "last": [B, 1, V], the last position only;
    kv_cache "static": fixed cache slots and a write_indices input (see the module docstring)."""
    static = kv_cache == "static"
    kv_in = (BATCH, num_heads, CACHE_SEQUENCE if static else PAST_SEQUENCE, head_dim)
    kv_out = (BATCH, num_heads, CACHE_SEQUENCE if static else TOTAL_SEQUENCE, head_dim)
    inputs = [
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
        TensorSpec(ATTENTION_MASK, "int64", (BATCH, CACHE_SEQUENCE if static else TOTAL_SEQUENCE)),
        TensorSpec(POSITION_IDS, "int64", (BATCH, SEQUENCE)),
    ]
    if static:
        inputs.append(TensorSpec(WRITE_INDICES, "int64", (BATCH,)))
    outputs = [TensorSpec(LOGITS, "float32", (BATCH, SEQUENCE if logits == "all" else 1, vocab_size))]
    for i in range(num_layers):
        inputs += [TensorSpec(past_key(i), kv_dtype, kv_in), TensorSpec(past_value(i), kv_dtype, kv_in)]
        outputs += [TensorSpec(present_key(i), kv_dtype, kv_out), TensorSpec(present_value(i), kv_dtype, kv_out)]
    return inputs, outputs


def head_io_spec(task: str, hidden_size: int, num_labels: int) -> tuple[list, list]:
    """(inputs, outputs) of a head graph (`task` in HEAD_TASKS), as optimum exports these tasks: input_ids and
    attention_mask [B, S] in (positions are computed from the mask), fp32 outputs:
    text-classification logits [B, num_labels] (the last real token of each row), token-classification logits
    [B, S, num_labels], question-answering start_logits and end_logits [B, S], feature-extraction
    last_hidden_state [B, S, hidden]."""
    inputs = [TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)), TensorSpec(ATTENTION_MASK, "int64", (BATCH, SEQUENCE))]
    outputs = {
        TEXT_CLASSIFICATION: [TensorSpec(LOGITS, "float32", (BATCH, num_labels))],
        TOKEN_CLASSIFICATION: [TensorSpec(LOGITS, "float32", (BATCH, SEQUENCE, num_labels))],
        QUESTION_ANSWERING: [TensorSpec(START_LOGITS, "float32", (BATCH, SEQUENCE)),
                             TensorSpec(END_LOGITS, "float32", (BATCH, SEQUENCE))],
        FEATURE_EXTRACTION: [TensorSpec(LAST_HIDDEN_STATE, "float32", (BATCH, SEQUENCE, hidden_size))],
    }[task]
    return inputs, outputs


def logits_rows(output_spec: TensorSpec, sequence: int) -> int:
    """Positions the graph returns logits for in a step of `sequence` tokens (all, or 1 for last-only graphs)."""
    return sequence if isinstance(output_spec.shape[1], str) else int(output_spec.shape[1])


def prompt_feeds(ids, mask, pos, layers: int, heads: int, head_dim: int, kv_dtype: str, static: bool = False) -> dict:
    """Feeds for a prompt step (past_sequence 0): the three id inputs and empty past tensors (for a static
    cache: S zeroed slots and write_indices 0)."""
    import numpy as np

    empty = np.zeros((len(ids), heads, ids.shape[1] if static else 0, head_dim), kv_dtype)
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: pos}
    if static:
        feeds[WRITE_INDICES] = np.zeros(len(ids), np.int64)
    for i in range(layers):
        feeds[past_key(i)] = feeds[past_value(i)] = empty
    return feeds
