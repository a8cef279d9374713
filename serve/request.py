"""The served model's I/O as data, and one request's tensors turned into a prompt and `GenerationOptions`
keywords -- every refusal names the field, as clients send it (Triton's generate extension maps JSON keys to
these input names)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from neoxrt.errors import GrammarError, NeoxrtError
from neoxrt.runtime.structured import StructuredOutputs

DEFAULT_MAX_TOKENS = 32  # as `neoxrt generate`
SEED_LIMIT = 2**63


class RequestError(NeoxrtError):
    """A request's inputs are missing or out of range; the message names the field (`param`, as clients send it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Field:
    name: str
    triton_type: str  # config.pbtxt data_type
    dims: tuple[int, ...]
    optional: bool = True


INPUTS = (
    Field("text_input", "TYPE_STRING", (1,), optional=True),  # optional to Triton so that we refuse it by name
    Field("max_tokens", "TYPE_INT32", (1,)),
    Field("temperature", "TYPE_FP32", (1,)),
    Field("top_k", "TYPE_INT32", (1,)),
    Field("top_p", "TYPE_FP32", (1,)),
    Field("repetition_penalty", "TYPE_FP32", (1,)),
    Field("seed", "TYPE_INT64", (1,)),
    Field("stop", "TYPE_STRING", (-1,)),
    Field("stream", "TYPE_BOOL", (1,)),
    Field("ignore_eos", "TYPE_BOOL", (1,)),  # as vLLM's: run max_tokens even past EOS (benchmarks)
    Field("structured_outputs", "TYPE_STRING", (1,)),  # JSON text: vLLM's {"json"|"regex"|"choice"|"grammar"|"json_object"}
    Field("response_format", "TYPE_STRING", (1,)),  # JSON text: OpenAI's {"type": "json_object" | "json_schema", ...}
)
OUTPUTS = (
    Field("text_output", "TYPE_STRING", (-1,)),
    Field("output_ids", "TYPE_INT64", (-1,)),
    Field("finish_reason", "TYPE_STRING", (-1,)),
)


@dataclass(frozen=True)
class ParsedRequest:
    prompt: str
    options: dict  # GenerationOptions keywords
    stream: bool


def parse_request(get: Callable[[str], np.ndarray | None]) -> ParsedRequest:
    """`get(name)` returns an input's array or None when the client did not send it.

    Raises:
        RequestError: a missing text_input, or a value out of range (named by its input name).
    """
    text = _one(get, "text_input")
    if text is None:
        raise RequestError("text_input is required: the prompt as a string")
    prompt = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    if not prompt:
        raise RequestError("text_input is empty: expected a prompt of at least one token")
    options: dict = {"max_new_tokens": _integer(get, "max_tokens", DEFAULT_MAX_TOKENS, low=1)}
    for name in ("temperature", "top_p", "repetition_penalty"):  # ranges: GenerationOptions, by the same names
        value = _number(get, name)
        if value is not None:
            options[name] = value
    if get("top_k") is not None:
        options["top_k"] = _integer(get, "top_k", 0, low=0)
    if get("seed") is not None:
        options["seed"] = _integer(get, "seed", 0, low=0, high=SEED_LIMIT - 1)
    stop = get("stop")
    if stop is not None:
        strings = tuple(s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in np.ravel(stop))
        if any(not s for s in strings):
            raise RequestError("stop must not contain an empty string")
        options["stop_strings"] = strings
    if _flag(get, "ignore_eos"):
        options["ignore_eos"] = True
    texts = {name: _json_text(get, name) for name in ("structured_outputs", "response_format")}
    spec = structured_spec(texts["structured_outputs"], texts["response_format"])
    if spec is not None:
        options["structured_outputs"] = spec
    return ParsedRequest(prompt, options, _flag(get, "stream"))


def structured_spec(structured, response_format) -> StructuredOutputs | None:
    """The constraint of a request: vLLM's `structured_outputs` object, or OpenAI's `response_format`
    ({"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema", "strict"}});
    None when neither constrains. Not compiled here (the scheduler's submit compiles it, time-limited).

    Raises:
        RequestError: both given, or either malformed (named, with param).
    """
    if structured is not None and response_format not in (None, {"type": "text"}):
        raise RequestError("give structured_outputs or response_format, not both", "response_format")
    if structured is not None:
        try:
            return StructuredOutputs.parse(structured)
        except GrammarError as exc:
            raise RequestError(str(exc), "structured_outputs") from None
    if response_format is None:
        return None
    kinds = ("text", "json_object", "json_schema")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in kinds:
        raise RequestError(f"response_format must be an object with type one of {', '.join(kinds)}, got "
                           f"{json.dumps(response_format)[:80]}", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs.parse({"json_object": True})
    block = response_format.get("json_schema")
    if not isinstance(block, dict) or not isinstance(block.get("name"), str) or not block["name"]:
        raise RequestError("response_format.json_schema must be an object with a name (a string) and a schema",
                           "response_format.json_schema")
    unknown = sorted(set(block) - {"name", "schema", "strict", "description"})
    if unknown:
        raise RequestError(f"response_format.json_schema: unknown field {unknown[0]!r}; expected name, schema, strict, "
                           "description", "response_format.json_schema")
    if block.get("strict") not in (None, True, False):
        raise RequestError(f"response_format.json_schema.strict must be true or false, got {block['strict']!r:.40}",
                           "response_format.json_schema.strict")
    schema = block.get("schema", {})
    if not isinstance(schema, dict):
        raise RequestError(f"response_format.json_schema.schema must be a JSON schema (an object), got "
                           f"{type(schema).__name__}", "response_format.json_schema.schema")
    return StructuredOutputs.parse({"json": schema})


def _json_text(get, name: str):
    """A JSON-text input (Triton's generate endpoint takes strings) parsed, or None when not sent."""
    text = _one(get, name)
    if text is None:
        return None
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{name} must be JSON text (an object), got {text[:60]!r}: {exc}", name) from None


def _one(get, name: str):
    array = get(name)
    if array is None:
        return None
    flat = np.ravel(array)
    if flat.size != 1:
        raise RequestError(f"{name} must be one value, got {flat.size}")
    return flat[0].item() if hasattr(flat[0], "item") and not isinstance(flat[0], bytes) else flat[0]


def _integer(get, name: str, default: int, low: int, high: int | None = None) -> int:
    value = _one(get, name)
    if value is None:
        return default
    what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high + 1})"
    if isinstance(value, (bool, bytes, str)) or not isinstance(value, (int, float)) or \
            isinstance(value, float) and not value.is_integer():
        raise RequestError(f"{name} must be {what}, got {value!r:.80}")
    if not low <= int(value) <= (high if high is not None else int(value)):
        raise RequestError(f"{name} must be {what}, got {int(value)}")
    return int(value)


def _number(get, name: str) -> float | None:
    """A finite number or None (not sent); its range is GenerationOptions' (same name)."""
    value = _one(get, name)
    if value is None:
        return None
    if isinstance(value, (bool, bytes, str)) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r:.80}")
    return float(value)


def _flag(get, name: str) -> bool:
    """true / false (or 1 / 0); False when not sent."""
    value = _one(get, name)
    if value is None:
        return False
    if value not in (True, False) or isinstance(value, (bytes, str, float)):
        raise RequestError(f"{name} must be true or false, got {value!r:.80}")
    return bool(value)
