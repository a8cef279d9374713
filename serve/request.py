"""The served model's I/O as data, and one request's tensors turned into a prompt and `GenerationOptions`
keywords -- every refusal names the field, as clients send it (Triton's generate extension maps JSON keys to
these input names)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from neoxrt.errors import NeoxrtError

DEFAULT_MAX_TOKENS = 32  # as `neoxrt generate`
SEED_LIMIT = 2**63


class RequestError(NeoxrtError):
    """A request's inputs are missing or out of range; the message names the field."""


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
    return ParsedRequest(prompt, options, _flag(get, "stream"))


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
