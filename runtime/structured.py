"""Structured outputs: a request's output held to a JSON schema, a regex, a list of choices or a grammar, as a
logits processor the generation loops apply -- one `Constraint` per row, llguidance behind it (torch-free: its
numpy path). The loops do not know JSON: they ask each row's constraint for the tokens it allows next, set the
others' logits to -inf before any sampling step, and `advance(token)` it when the token is emitted.

    spec (vLLM's StructuredOutputsParams names) --StructuredOutputs.parse--> kind + text (hashable, a cache key)
        --Grammars.constraint--> compiled once per spec (off the loop's thread, time-limited), deep-copied per row
        --> Constraint: allowed() [V] bool, advance(token), rollback(n), finished

A step's masks are filled together (`fill`: several rows on llguidance's threads) once its logits are back, and
applied in place where the caller keeps no unmasked logits.

JSON is compact (no whitespace between tokens, as strict OpenAI output is), so a bounded schema (string lengths,
enums, integer ranges, array sizes) always finishes within a bounded number of tokens, whatever the model.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from neoxrt.errors import GrammarError

KINDS = ("json", "regex", "choice", "grammar", "json_object")
COMPILE_TIMEOUT_S = 10.0  # a spec that takes longer to compile is refused (nested schemas have taken minutes elsewhere)
CACHE_SIZE = 256  # compiled grammars kept per model (least recently used dropped)
FINISHED = "grammar"  # a row's finish reason when its grammar is complete (OpenAI's "stop")


@dataclass(frozen=True)
class StructuredOutputs:
    """One constraint, checked: `kind` one of KINDS, `text` the schema as JSON text, the regex, the choices as a
    JSON list, the grammar (Lark or GBNF/EBNF), or "" for json_object."""

    kind: str
    text: str

    @classmethod
    def parse(cls, value) -> StructuredOutputs | None:
        """From vLLM's `structured_outputs` object ({"json": SCHEMA} | {"regex": R} | {"choice": [...]} |
        {"grammar": EBNF} | {"json_object": true}), a `StructuredOutputs`, or None.

        Raises:
            GrammarError: not an object, an unknown key, none or several of the kinds, a value of the wrong type.
        """
        if value is None or isinstance(value, StructuredOutputs):
            return value
        if not isinstance(value, dict):
            raise GrammarError(f"structured_outputs must be an object with one of {', '.join(KINDS)}, got "
                               f"{type(value).__name__}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise GrammarError(f"structured_outputs: unknown key {unknown[0]!r}; expected one of {', '.join(KINDS)}")
        given = [k for k in KINDS if value.get(k) not in (None, False)]
        if len(given) != 1:
            raise GrammarError(f"structured_outputs must set exactly one of {', '.join(KINDS)}, got "
                               f"{', '.join(given) or 'none'}")
        kind, spec = given[0], value[given[0]]
        if kind == "json":
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except json.JSONDecodeError as exc:
                    raise GrammarError(f"structured_outputs.json: not valid JSON ({exc})") from None
            if not isinstance(spec, (dict, bool)):
                raise GrammarError(f"structured_outputs.json must be a JSON schema (an object), got {type(spec).__name__}")
            try:
                return cls(kind, json.dumps(spec, allow_nan=False))  # key order kept: it is the output's
            except (TypeError, ValueError) as exc:  # from Python: a value JSON has no form for
                raise GrammarError(f"structured_outputs.json must be JSON data, got {exc}") from None
        if kind == "json_object":
            if spec is not True:
                raise GrammarError(f"structured_outputs.json_object must be true, got {spec!r:.40}")
            return cls(kind, "")
        if kind == "choice":
            if not isinstance(spec, list) or not spec or not all(isinstance(s, str) and s for s in spec):
                raise GrammarError(f"structured_outputs.choice must be a non-empty list of non-empty strings, got {spec!r:.80}")
            return cls(kind, json.dumps(spec))
        if not isinstance(spec, str) or not spec:
            raise GrammarError(f"structured_outputs.{kind} must be a non-empty string, got {spec!r:.80}")
        return cls(kind, spec)

    def grammar(self) -> str:
        """The llguidance grammar for this constraint (not yet compiled).

        Raises:
            GrammarError: a GBNF grammar that does not convert (llguidance's reason).
        """
        import llguidance

        if self.kind in ("json", "json_object"):
            schema = self.text if self.kind == "json" else '{"type": "object"}'
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.text)
        if self.kind == "choice":  # one lexeme of alternatives: not an Earley row per choice (llguidance caps a
            # row at 2000 items: a longer list failed at its first token)
            alternatives = " | ".join(json.dumps(s, ensure_ascii=False) for s in json.loads(self.text))
            return llguidance.LLMatcher.grammar_from_lark("start: CHOICE\nCHOICE: " + alternatives)
        try:
            return llguidance.grammar_from("grammar", self.text)
        except ValueError as exc:
            raise GrammarError(f"structured_outputs.grammar: {_one_line(str(exc))}") from None


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Constraint:
    """One row's grammar state over a vocabulary of `vocab` logits (the model's, padding ids included)."""

    __slots__ = ("matcher", "vocab", "_bits", "_banned", "_forced", "_stopped")

    def __init__(self, matcher, vocab: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher, self.vocab = matcher, vocab
        self._bits = allocate_token_bitmask(1, vocab)[0]  # llguidance's bitmask of the allowed tokens
        self._banned: np.ndarray | None = None  # the current state's mask, unpacked and inverted; None: not filled
        self._forced: int | None = None  # the current state's forced token, -1 none; None: not asked
        self._stopped: bool | None = None  # the current state's `finished`; None: not asked

    def _new_state(self) -> None:
        self._banned = self._forced = self._stopped = None

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS)."""
        if self._stopped is None:
            self._stopped = self.matcher.is_stopped()
        return self._stopped

    def forced(self) -> int:
        """The one token the grammar allows next where it forces bytes (`"text":"` after `{`), else -1. Where it
        forces bytes llguidance's mask is that one token, the first of their canonical tokenization (its
        TokenParser::compute_mask_inner: `singleton_token_set(ff_tokens[0])`; tests/runtime/test_structured.py
        checks the two agree), so no mask need be computed there."""
        if self._forced is None:  # not compute_ff_bytes first: it forces bytes even where a grammar says no_forcing
            ff = self.matcher.compute_ff_tokens()
            self._forced = int(ff[0]) if ff else -1
        return self._forced

    def banned(self) -> np.ndarray:
        """[V] bool: the tokens the grammar does not allow next. The library computes its bitmask without the GIL;
        the bits are unpacked inverted, so that masking is one `copyto` (no boolean negation per step)."""
        if self._banned is None:
            fill([self])
        return self._banned

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens the grammar allows next (EOS where it may end here)."""
        return ~self.banned()

    def accepts(self, token: int) -> bool:
        """Whether the mask allows `token` next, without computing the mask. Where the grammar forces bytes (after
        `48` in `"age":48,"role"...`) the mask is their canonical first token (`,"`: `forced`), while llguidance's
        check of one token also passes other spellings (`,`); elsewhere that check agrees with the mask
        (tests/runtime/test_structured.py checks both over every token of many states)."""
        token = int(token)
        if not 0 <= token < self.vocab:
            return False
        if self._banned is not None:
            return not self._banned[token]
        forced = self.forced()
        if forced >= 0:
            return token == forced
        return self.matcher.validate_tokens([token]) == 1

    def advance(self, token: int) -> None:
        """Take the emitted `token`.

        Raises:
            GrammarError: the grammar does not allow it (the loop masks, so this is a bug, not bad input).
        """
        self._new_state()
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} is not allowed by the grammar here: {_one_line(self.matcher.get_error())}")

    def rollback(self, tokens: int) -> None:
        """Undo the last `tokens` advances (speculative decoding's rejected guesses)."""
        if tokens:
            self._new_state()
            if not self.matcher.rollback(int(tokens)):
                raise GrammarError(f"the grammar state could not roll back {tokens} tokens: {self.matcher.get_error()}")


@functools.cache
def _executor():
    """llguidance's thread pool, made on first use: several rows' masks filled in one call, on every core."""
    import llguidance

    return llguidance.LLExecutor()


def fill(constraints) -> None:
    """Compute the next mask of every constraint among `constraints` that has none (None: an unconstrained row):
    one row on this thread, several at once on llguidance's threads (the GIL released either way). Measured on 2
    cores, this beats filling them on a worker thread while the model's step runs: ONNX Runtime's threads hold
    both cores during the step, and a third thread preempting one of them stalls the other at every barrier
    (the step grew by twice the masks' own time)."""
    rows = [c for c in constraints if c is not None and c._banned is None]
    for c in rows:
        if c._forced is not None and c._forced >= 0:  # known: its mask is that one token
            c._banned = np.ones(c.vocab, bool)
            c._banned[c._forced] = False
    rows = [c for c in rows if c._banned is None]
    if not rows:
        return
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask, fill_next_token_bitmask_par

    vocab = rows[0].vocab
    if len(rows) == 1:
        fill_next_token_bitmask(rows[0].matcher, rows[0]._bits[None])
        bits = rows[0]._bits[None]
    else:
        bits = allocate_token_bitmask(len(rows), vocab)
        fill_next_token_bitmask_par(_executor(), [(c.matcher, j) for j, c in enumerate(rows)], bits)
    banned = np.unpackbits((~bits).view(np.uint8), axis=-1, count=vocab, bitorder="little").view(bool)
    for j, c in enumerate(rows):
        c._banned = banned[j]


def masked(logits: np.ndarray, constraints, copy: bool = True) -> np.ndarray:
    """Logits [B, V] with each row's disallowed tokens at -inf (rows without a constraint, or finished, as they
    are; the dtype kept); the input itself when no row is constrained. `copy=False` masks `logits` in place (for
    a caller that needs no unmasked logits)."""
    rows = [j for j, c in enumerate(constraints) if c is not None and not c.finished]
    if not rows:
        return logits
    fill([constraints[j] for j in rows])
    out = np.array(logits) if copy else logits
    for j in rows:
        banned = constraints[j].banned()
        width = min(len(banned), out.shape[-1])
        np.copyto(out[j, :width], -np.inf, where=banned[:width])
    return out


class Grammars:
    """The compiled grammars of one model's tokenizer: each spec compiled once (on a worker thread, at most
    `timeout_s`), kept in an LRU cache, and deep-copied for every row that uses it."""

    def __init__(self, tokenizer_json: str, vocab: int, eos_token_id: int | None, timeout_s: float = COMPILE_TIMEOUT_S):
        self._source, self.vocab, self.eos, self.timeout_s = tokenizer_json, vocab, eos_token_id, timeout_s
        self._tokenizer = None
        self._cache: OrderedDict[StructuredOutputs, object] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance

            self._tokenizer = llguidance.LLTokenizer(self._source, n_vocab=self.vocab,
                                                     **({"eos_token": self.eos} if self.eos is not None else {}))
        return self._tokenizer

    def constraint(self, spec: StructuredOutputs) -> Constraint:
        """A fresh `Constraint` for one row.

        Raises:
            GrammarError: the engine refused the spec (its reason, one line), or compiling took over `timeout_s`.
        """
        with self._lock:
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
                return Constraint(template.deep_copy(), self.vocab)  # copied under the lock: callers on any thread
        template = self._compile_limited(spec)
        with self._lock:
            self._cache[spec] = template
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return Constraint(template.deep_copy(), self.vocab)

    def _compile_limited(self, spec: StructuredOutputs):
        """Compile on a thread of its own (llguidance releases the GIL while it compiles); past `timeout_s` the
        caller is refused, and the thread is left to finish in the background (its result is dropped, not cached)."""
        result: list = []
        tokenizer = self._llg_tokenizer()  # once per model, not part of a spec's compile time

        def run():
            try:
                result.append(self._compile(spec, tokenizer))
            except Exception as exc:  # handed to the caller
                result.append(exc)

        start = time.monotonic()
        thread = threading.Thread(target=run, name="neoxrt-grammar", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if not result or time.monotonic() - start > self.timeout_s:  # also one that held the GIL past the limit
            raise GrammarError(f"structured_outputs.{spec.kind}: compiling it took longer than {self.timeout_s:g} s; "
                               "simplify the schema or grammar")
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    @staticmethod
    def _compile(spec: StructuredOutputs, tokenizer):
        import llguidance

        try:
            grammar = spec.grammar()
        except ValueError as exc:  # llguidance: a schema that is not a JSON object
            raise GrammarError(f"structured_outputs.{spec.kind}: {_one_line(str(exc))}") from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"structured_outputs.{spec.kind}: {_one_line(matcher.get_error())}")
        return matcher


class Lookahead:
    """Speculative decoding's guesses under each row's constraint: `take(tokens)` advances every row's constraint
    by its guessed token while the grammar allows it (a refused guess stops that row's lookahead: it ends the
    accepted run there), `undo()` rolls every constraint back exactly to where it was."""

    def __init__(self, constraints):
        self.constraints = list(constraints)
        self.taken = [0] * len(self.constraints)
        self.open = [c is not None and not c.finished for c in self.constraints]

    def current(self) -> list:
        """Per row, the constraint to mask the next position with, or None (unconstrained, finished or refused)."""
        return [c if ok else None for c, ok in zip(self.constraints, self.open)]

    def take(self, tokens) -> None:
        for j, (c, token) in enumerate(zip(self.constraints, tokens)):
            if not self.open[j]:
                continue
            if not c.accepts(int(token)):
                self.open[j] = False
                continue
            c.advance(int(token))
            self.taken[j] += 1
            self.open[j] = not c.finished

    def undo(self) -> None:
        for c, n in zip(self.constraints, self.taken):
            if c is not None:
                c.rollback(n)


def masked_guesses(logits: np.ndarray, constraints, drafts: np.ndarray) -> np.ndarray:
    """Verify-step logits [B, K+1, V] masked position by position: position i by each row's constraint after its
    first i guesses (`drafts` [B, K]); positions after a guess its grammar refuses are left as they are (that guess
    is rejected, so nothing after it is used). The constraints end where they started."""
    if all(c is None for c in constraints):
        return logits
    ahead = Lookahead(constraints)
    out = np.array(logits)
    try:
        for i in range(logits.shape[1]):
            out[:, i] = masked(logits[:, i], ahead.current())
            if i < drafts.shape[1]:
                ahead.take(drafts[:, i])
    finally:
        ahead.undo()
    return out
