"""The one place where Hugging Face names become ours: `config.json` keys (transformers 4 and 5
spellings) and state-dict keys."""

from __future__ import annotations

import re

from neoxrt import contract as io
from neoxrt.errors import CheckpointError
from neoxrt.model.config import NeoXConfig
from neoxrt.model.task import HeadConfig

_MISSING = object()


def _find(cfg: dict, *keys: str, default=_MISSING):
    """Return the first present key's value; raise naming every key looked for."""
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    if default is _MISSING:
        raise CheckpointError(f"config.json: missing key; looked for {' / '.join(keys)}")
    return default


def _rope(cfg: dict) -> tuple[float, float, str, float]:
    """(rotary_pct, base, rope_type, factor) from either spelling.

    transformers 4: rotary_pct, rotary_emb_base (or rope_theta), rope_scaling {type|rope_type, factor}.
    transformers 5: rope_parameters {rope_type, rope_theta, partial_rotary_factor, factor}.
    """
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"config.json: rope_parameters must be an object, found {type(params).__name__}")
    params = params or {}
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"config.json: rope_scaling must be an object or null, found {type(scaling).__name__}")
    scaling = scaling or {}
    pct = _one_of(cfg, params, ("partial_rotary_factor", "rotary_pct"), 0.25)
    base = _one_of(cfg, params, ("rope_theta", "rotary_emb_base"), 10000.0)
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor", 1.0))
    if rope_type == "default":
        factor = 1.0
    return _number("rotary fraction", pct), _number("rope base", base), str(rope_type), _number("rope factor", factor)


def _one_of(cfg: dict, params: dict, keys: tuple[str, ...], default):
    """The value under any of `keys` (rope_parameters first); two spellings that disagree are refused."""
    found = {k: params[k] for k in keys if params.get(k) is not None}
    found.update({k: cfg[k] for k in keys if cfg.get(k) is not None and k not in found})
    def key(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)

    if len({key(v) for v in found.values()}) > 1:
        raise CheckpointError("config.json: " + " and ".join(f"{k}={v!r}" for k, v in found.items())
                              + " disagree; expected one value")
    return next(iter(found.values()), default)


def _number(name: str, value) -> float:
    """A finite number, or CheckpointError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise CheckpointError(f"config.json: {name} must be a finite number, found {value!r}")
    return float(value)


def config_from_hf(cfg: dict) -> NeoXConfig:
    """Translate a Hugging Face GPT-NeoX `config.json` (already parsed) into a `NeoXConfig`.

    Raises:
        CheckpointError: not a GPT-NeoX config, a required key missing, or a feature we do not support.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json: expected a JSON object, found {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type != "gpt_neox":
        raise CheckpointError(f"config.json: model_type must be 'gpt_neox', found {model_type!r}")
    pct, base, rope_type, factor = _rope(cfg)
    eos = cfg.get("eos_token_id", 0)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    try:
        return NeoXConfig(
            vocab_size=_find(cfg, "vocab_size"),
            hidden_size=_find(cfg, "hidden_size"),
            num_layers=_find(cfg, "num_hidden_layers"),
            num_heads=_find(cfg, "num_attention_heads"),
            intermediate_size=_find(cfg, "intermediate_size"),
            max_position_embeddings=_find(cfg, "max_position_embeddings", default=2048),
            rotary_pct=pct,
            rotary_base=base,
            rope_type=rope_type,
            rope_factor=factor,
            layer_norm_eps=_number("layer_norm_eps", _find(cfg, "layer_norm_eps", default=1e-5)),
            use_parallel_residual=_find(cfg, "use_parallel_residual", default=True),
            hidden_act=_find(cfg, "hidden_act", default="gelu"),
            attention_bias=_find(cfg, "attention_bias", default=True),
            tie_word_embeddings=_find(cfg, "tie_word_embeddings", default=False),
            bos_token_id=cfg.get("bos_token_id", 0),
            eos_token_id=eos,
        )
    except TypeError as exc:  # e.g. a string where a number belongs
        raise CheckpointError(f"config.json: malformed value ({exc})") from None


def config_to_hf(config: NeoXConfig) -> dict:
    """A transformers-4 style `config.json` for `config` (used to write checkpoints and artifacts)."""
    rope_scaling = None if config.rope_type == "default" else {"rope_type": config.rope_type, "factor": config.rope_factor}
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rotary_pct": config.rotary_pct,
        "rotary_emb_base": config.rotary_base,
        "rope_scaling": rope_scaling,
        "layer_norm_eps": config.layer_norm_eps,
        "use_parallel_residual": config.use_parallel_residual,
        "hidden_act": config.hidden_act,
        "attention_bias": config.attention_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


# config.json `architectures` -> optimum's task name
ARCHITECTURE_TASKS = {
    "GPTNeoXForCausalLM": io.TEXT_GENERATION,
    "GPTNeoXForSequenceClassification": io.TEXT_CLASSIFICATION,
    "GPTNeoXForTokenClassification": io.TOKEN_CLASSIFICATION,
    "GPTNeoXForQuestionAnswering": io.QUESTION_ANSWERING,
    "GPTNeoXModel": io.FEATURE_EXTRACTION,
}
TASK_ARCHITECTURES = {task: arch for arch, task in ARCHITECTURE_TASKS.items()}


def head_from_hf(cfg: dict, task: str | None = None) -> HeadConfig:
    """The head a `config.json` describes: the task named by `architectures` (the causal LM when absent) unless
    `task` overrides it, and the labels (`id2label`, else `num_labels` generic names, else two).

    Raises:
        CheckpointError: an architecture we do not know (without an override), or malformed labels.
    """
    if task is None:
        archs = cfg.get("architectures") or ["GPTNeoXForCausalLM"]
        known = [ARCHITECTURE_TASKS[a] for a in archs if a in ARCHITECTURE_TASKS]
        if not known:
            raise CheckpointError(f"config.json: architectures {archs} names no GPT-NeoX head we export; expected one of "
                                  f"{', '.join(ARCHITECTURE_TASKS)} (or pass --task)")
        task = known[0]
    id2label = cfg.get("id2label")
    if id2label is None:
        num = cfg.get("num_labels", 2)
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise CheckpointError(f"config.json: num_labels must be a positive integer, found {num!r}")
        labels = tuple(f"LABEL_{i}" for i in range(num))
    else:
        try:
            by_index = {int(k): str(v) for k, v in dict(id2label).items()}
        except (TypeError, ValueError):
            raise CheckpointError(f"config.json: id2label must map class indices to names, found {id2label!r}") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise CheckpointError(f"config.json: id2label indices must be 0..{len(by_index) - 1}, found {sorted(by_index)}")
        labels = tuple(by_index[i] for i in range(len(by_index)))
    return HeadConfig(task=task, id2label=labels)


def head_to_hf(head: HeadConfig) -> dict:
    """The `config.json` keys that describe `head` (architectures and labels)."""
    return {"architectures": [TASK_ARCHITECTURES[head.task]], "id2label": head.to_dict()["id2label"],
            "label2id": {label: i for i, label in enumerate(head.id2label)}}


# State-dict keys: Hugging Face name pattern -> our name pattern ({i} is the layer index).
_LAYER_KEYS = {
    "input_layernorm.weight": "ln_attn.weight",
    "input_layernorm.bias": "ln_attn.bias",
    "post_attention_layernorm.weight": "ln_mlp.weight",
    "post_attention_layernorm.bias": "ln_mlp.bias",
    "attention.query_key_value.weight": "qkv.weight",
    "attention.query_key_value.bias": "qkv.bias",
    "attention.dense.weight": "attn_out.weight",
    "attention.dense.bias": "attn_out.bias",
    "mlp.dense_h_to_4h.weight": "mlp_in.weight",
    "mlp.dense_h_to_4h.bias": "mlp_in.bias",
    "mlp.dense_4h_to_h.weight": "mlp_out.weight",
    "mlp.dense_4h_to_h.bias": "mlp_out.bias",
}
_TOP_KEYS = {
    "gpt_neox.embed_in.weight": "embed.weight",
    "gpt_neox.final_layer_norm.weight": "ln_f.weight",
    "gpt_neox.final_layer_norm.bias": "ln_f.bias",
    "embed_out.weight": "lm_head.weight",
    # the heads' output layers keep transformers' names
    "score.weight": "score.weight",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
    "qa_outputs.weight": "qa_outputs.weight",
    "qa_outputs.bias": "qa_outputs.bias",
}
# Buffers that old checkpoints carry and that we recompute.
_IGNORED_LAYER_KEYS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
_BARE_PREFIXES = ("embed_in.", "final_layer_norm.", "layers.")
_LAYER_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)$")
_OUR_TOP = {v: k for k, v in _TOP_KEYS.items()}
_OUR_LAYER = {v: k for k, v in _LAYER_KEYS.items()}


def _prefixed(hf_key: str) -> str:
    """A bare `GPTNeoXModel` checkpoint's names (no `gpt_neox.` prefix) read as the prefixed ones."""
    return "gpt_neox." + hf_key if hf_key.startswith(_BARE_PREFIXES) else hf_key


def our_key(hf_key: str) -> str | None:
    """Our state-dict name for a Hugging Face one; '' for known buffers to skip; None if unknown."""
    hf_key = _prefixed(hf_key)
    if hf_key in _TOP_KEYS:
        return _TOP_KEYS[hf_key]
    match = _LAYER_RE.match(hf_key)
    if match:
        index, rest = match.groups()
        if rest in _IGNORED_LAYER_KEYS:
            return ""
        if rest in _LAYER_KEYS:
            return f"layers.{index}.{_LAYER_KEYS[rest]}"
    return None


def layer_index(hf_key: str) -> int | None:
    """The layer a Hugging Face tensor name belongs to (buffers included); None for the embedding, final
    LayerNorm and heads."""
    match = _LAYER_RE.match(_prefixed(hf_key))
    return int(match.group(1)) if match else None


def hf_key(key: str) -> str:
    """The Hugging Face name of one of our state-dict keys (for messages and for writing checkpoints)."""
    if key in _OUR_TOP:
        return _OUR_TOP[key]
    _, index, rest = key.split(".", 2)
    return f"gpt_neox.layers.{index}.{_OUR_LAYER[rest]}"
