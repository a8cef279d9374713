"""OpenAI's completions API as data: a request body checked field by field (types, ranges, finite numbers; an
unknown field is refused, as OpenAI refuses it) into `ApiRequest`, every refusal an `ApiError` naming the field
in OpenAI's error shape; a chat conversation rendered with the artifact's chat template; and the response bodies
(`text_completion`, `chat.completion` and their stream chunks) built from the scheduler's tokens.

Fields the client leaves out take the artifact's generation_config.json defaults, else neoxrt's (greedy), as
vLLM does with a model's generation config; OpenAI's own default temperature is 1.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from neoxrt.contract import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from neoxrt.errors import NeoxrtError
from neoxrt.serve.request import RequestError, structured_spec

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # as vLLM's default max_logprobs (OpenAI's own limit is 5)
MAX_STOP = 4  # stop strings, as OpenAI
MAX_PROMPTS = 64  # prompts in one completions request
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions

# fields every endpoint takes; endpoint-specific ones are added below; `best_of`, penalties and `logit_bias` are
# accepted only at the values that change nothing (OpenAI's defaults)
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user",
           "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "repetition_penalty", "ignore_eos",
           "response_format", "structured_outputs"}
_COMPLETION = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
_ROLES = ("system", "user", "assistant", "tool", "developer")


class ApiError(NeoxrtError):
    """A request refused with an HTTP status and OpenAI's error body; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ApiRequest:
    """One checked request: prompts (text or token ids; for chat the rendered conversation) and the options."""

    prompts: list  # str or list[int] each
    options: dict  # GenerationOptions keywords shared by every choice (seed excluded)
    max_tokens: int  # 0 only with echo: the prompt scored, nothing generated
    n: int = 1
    seed: int | None = None  # choice k of each prompt uses seed + k
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    chat: bool = False
    format_param: str | None = None  # the field the constraint came in (response_format or structured_outputs)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError("request body is not valid JSON here: nested too deeply") from None
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no text can hold (the tokenizer would fail on them)
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(f"request body holds a lone UTF-16 surrogate ({exc.object[exc.start:exc.end]!a}): expected "
                       f"valid Unicode text") from None
    if not isinstance(body, dict):
        raise ApiError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(f"model is required: a string, the served model `{served}` (GET /v1/models)", "model")
    if model != served:
        raise ApiError(f"The model `{model}` does not exist; this server serves `{served}`", "model", 404,
                       code="model_not_found")


def completion_request(body: dict, served: str) -> ApiRequest:
    """A /v1/completions body, checked.

    Raises:
        ApiError: an unknown field, a field of the wrong type or out of range (named), an unknown model (404).
    """
    _unknown(body, _COMPLETION)
    check_model(body, served)
    prompts = _prompts(body.get("prompt"))
    echo = _bool(body, "echo", False)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    for name, neutral in (("best_of", 1), ("suffix", None)):
        if body.get(name) not in (None, neutral):
            raise ApiError(f"{name} is not supported by this server (only {json.dumps(neutral)})", name)
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 0 if echo else 1, None)
    return _common(body, prompts, max_tokens, echo=echo, logprobs=logprobs, chat=False)


def chat_request(body: dict, served: str, template: ChatTemplate | None) -> ApiRequest:
    """A /v1/chat/completions body, checked and rendered with the artifact's chat template.

    Raises:
        ApiError: no chat template in the artifact, or a bad field (named), an unknown model (404).
    """
    _unknown(body, _CHAT)
    check_model(body, served)
    messages = _messages(body.get("messages"))
    if template is None:
        raise ApiError(f"the model `{served}` has no chat template (no chat_template in its tokenizer_config.json "
                       f"or {CHAT_TEMPLATE_FILE} in the artifact): use /v1/completions with a prompt", "messages")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise ApiError("logprobs are served by /v1/completions here, not by chat completions", "logprobs")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ApiError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, DEFAULT_MAX_TOKENS, 1, None)
    return _common(body, [template.render(messages)], max_tokens, echo=False, logprobs=None, chat=True)


def _common(body: dict, prompts: list, max_tokens: int, echo: bool, logprobs: int | None, chat: bool) -> ApiRequest:
    options: dict = {}
    temperature = _float(body, "temperature", None, 0.0, 2.0)
    if temperature is not None:
        options["temperature"] = temperature
    top_p = _float(body, "top_p", None, 0.0, 1.0)
    if top_p is not None:
        if top_p == 0.0:
            raise ApiError("top_p must be in (0, 1], got 0", "top_p")
        options["top_p"] = top_p
    top_k = _int(body, "top_k", None, -1, None)  # vLLM's extension; -1 or 0: off
    if top_k is not None:
        options["top_k"] = max(top_k, 0)
    penalty = _float(body, "repetition_penalty", None, 0.0, None)  # vLLM's extension (transformers' meaning)
    if penalty is not None:
        if penalty == 0.0:
            raise ApiError("repetition_penalty must be > 0, got 0", "repetition_penalty")
        options["repetition_penalty"] = penalty
    if _bool(body, "ignore_eos", False):  # vLLM's extension: run max_tokens past EOS (benchmarks)
        options["ignore_eos"] = True
    for name in ("presence_penalty", "frequency_penalty"):
        if _float(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(f"{name} is not supported by this server (only 0; repetition_penalty is)", name)
    bias = body.get("logit_bias")
    if bias not in (None, {}):
        raise ApiError("logit_bias is not supported by this server (only {} or null)", "logit_bias")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(f"user must be a string, got {_kind(body['user'])}", "user")
    stop = _stop(body.get("stop"))
    if stop:
        options["stop_strings"] = stop
    try:  # OpenAI's response_format or vLLM's structured_outputs; compiled at submit
        spec = structured_spec(body.get("structured_outputs"), body.get("response_format"))
    except RequestError as exc:
        raise ApiError(str(exc), exc.param) from None
    if spec is not None:
        options["structured_outputs"] = spec
    n = _int(body, "n", 1, 1, MAX_N)
    if n > 1 and options.get("temperature", None) == 0.0:
        raise ApiError("n > 1 needs sampling (temperature > 0): greedy decoding gives n identical choices", "n")
    if logprobs is not None:
        options["logprobs"] = logprobs
    stream = _bool(body, "stream", False)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise ApiError("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "continuous_usage_stats"}:
            raise ApiError(f"stream_options must be an object with include_usage, got {stream_options!r}", "stream_options")
        include_usage = _bool(stream_options, "include_usage", False, "stream_options.include_usage")
    return ApiRequest(prompts, options, max_tokens, n=n, seed=_int(body, "seed", None, 0, 2**63 - 1), echo=echo,
                      logprobs=logprobs, stream=stream, include_usage=include_usage, chat=chat,
                      format_param=("structured_outputs" if body.get("structured_outputs") is not None else
                                    "response_format") if spec is not None else None)


# -- field checks ---------------------------------------------------------------------------------------------
def _kind(value) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _unknown(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise ApiError(f"Unrecognized request argument supplied: {extra[0]}", extra[0])


def _int(body: dict, name: str, default, low: int, high: int | None, label: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    span = f"[{low}, {high}]" if high is not None else f">= {low}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(f"{label or name} must be an integer {span}, got {_kind(value)} {value!r}", label or name)
    if value < low or (high is not None and value > high):
        raise ApiError(f"{label or name} must be an integer {span}, got {value}", label or name)
    return value


def _float(body: dict, name: str, default, low: float, high: float | None):
    value = body.get(name)
    if value is None:
        return default
    span = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(f"{name} must be a number {span}, got {_kind(value)} {value!r}", name)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        raise ApiError(f"{name} must be a finite number {span}, got {value!r}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool, label: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{label or name} must be true or false, got {_kind(value)} {value!r}", label or name)
    return value


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise ApiError(f"stop must be a string or a list of strings, got {_kind(value)}", "stop")
    if len(strings) > MAX_STOP or any(not s for s in strings):
        raise ApiError(f"stop must hold 1 to {MAX_STOP} non-empty strings, got {strings!r}", "stop")
    return tuple(strings)


def _prompts(value) -> list:
    """A string, a list of token ids, or a list of either."""
    bad = ApiError("prompt is required: a string, a list of token ids, or a list of strings or token-id lists", "prompt")
    if isinstance(value, str):
        rows = [value]
    elif isinstance(value, list) and value and all(_is_token(t) for t in value):
        rows = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or isinstance(p, list) for p in value):
        rows = value
    else:
        raise bad
    if len(rows) > MAX_PROMPTS:
        raise ApiError(f"prompt holds {len(rows)} prompts; at most {MAX_PROMPTS} a request", "prompt")
    for row in rows:
        if not row or (isinstance(row, list) and not all(_is_token(t) for t in row)):
            raise ApiError("prompt must not be empty, and token-id lists must hold integers only", "prompt")
    return rows


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError("messages is required: a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(f"messages[{i}].role must be one of {', '.join(_ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(f"messages[{i}].content parts must be {{type: text, text}} (no images here)",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string, got {_kind(content)}", f"messages[{i}].content")
        out.append({**m, "content": content})
    return out


# -- chat template ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatTemplate:
    """The artifact's chat template (Jinja, transformers' conventions), rendered in a sandbox."""

    source: str
    special: dict = field(default_factory=dict)  # bos_token / eos_token strings

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ApiError(f"the chat template refused the conversation: {message}", "messages")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.source).render(messages=messages, add_generation_prompt=True, **self.special)
        except TemplateError as exc:
            raise ApiError(f"the chat template failed on this conversation: {exc}", "messages") from None


def chat_template(artifact: Path) -> ChatTemplate | None:
    """From `chat_template.jinja` or tokenizer_config.json's `chat_template` (a string, or named templates with a
    "default"); None when the artifact has neither."""
    config = {}
    path = Path(artifact) / TOKENIZER_CONFIG_FILE
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
    special = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    jinja = Path(artifact) / CHAT_TEMPLATE_FILE
    source = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    return ChatTemplate(source, special) if isinstance(source, str) and source.strip() else None


# -- responses ------------------------------------------------------------------------------------------------
@dataclass
class Choice:
    """One choice as it is being produced."""

    index: int
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    scores: list = field(default_factory=list)  # per token (log p, [(token, log p)]) with logprobs
    prompt_scores: list | None = None  # per prompt token, with echo and logprobs
    finish_reason: str | None = None
    sent: str = ""  # streamed text so far (new tokens only)


FINISH = {"stop_token": "stop", "stop_string": "stop", "grammar": "stop", "length": "length"}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def logprobs_block(tokenizer, ids: list[int], scores: list, offset: int) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs (the top N and the chosen token,
    as OpenAI returns up to N + 1), text_offset."""
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    top = []
    for tok, score in zip(tokens, scores):
        if score is None:
            top.append(None)
            continue
        entry = {tokenizer.decode([t]): lp for t, lp in score[1]}
        entry.setdefault(tok, score[0])
        top.append(entry)
    return {"tokens": tokens, "token_logprobs": [None if s is None else s[0] for s in scores],
            "top_logprobs": top, "text_offset": offsets}


def usage(choices: list[Choice], prompts: list[list[int]], counted: bool = True) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.ids) for c in choices) if counted else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(rid: str, model: str, chat: bool, chunk: bool, choices: list, extra: dict | None = None) -> dict:
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            **(extra or {})}
