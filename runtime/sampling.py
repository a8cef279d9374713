"""Next-token selection on fp32 logits [B, V], with transformers' semantics and order:
repetition penalty, then temperature, top-k, top-p; temperature 0 is greedy (exact argmax)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from neoxrt.contract import MAX_COUNT
from neoxrt.errors import RuntimeShapeError
from neoxrt.runtime.structured import StructuredOutputs, masked


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_ids(name: str, ids) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or \
            not all(_is_int(t) and t >= 0 for t in ids):
        raise RuntimeShapeError(f"{name} must be lists of token ids (integers >= 0), got {ids!r:.80}")
    return tuple(int(t) for t in ids)


# (field, low, high, what is expected): integers; seed and logprobs may also be None; counts at most MAX_COUNT
_INTEGERS = (
    ("max_new_tokens", 1, MAX_COUNT, "an integer >= 1"),
    ("top_k", 0, MAX_COUNT, "an integer >= 0 (0 = off)"),
    ("min_new_tokens", 0, MAX_COUNT, "an integer >= 0"),
    ("no_repeat_ngram_size", 0, MAX_COUNT, "an integer >= 0"),
    ("seed", 0, 2**63 - 1, "an integer in [0, 2**63)"),
    ("logprobs", 0, 20, "an integer in [0, 20]"),
)
# (field, range test, what is expected): finite numbers
_REALS = (
    ("temperature", lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("repetition_penalty", lambda v: v > 0, "a finite number > 0"),
    ("typical_p", lambda v: 0 < v <= 1, "in (0, 1]"),
)


@dataclass(frozen=True)
class GenerationOptions:
    """Keyword names follow transformers' `generate()`."""

    max_new_tokens: int = 32
    temperature: float | None = None  # None: 1.0 when do_sample, else greedy; 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: run the full max_new_tokens even past EOS
    do_sample: bool | None = None  # None: sample iff temperature > 0 (neoxrt's rule); False: greedy whatever else
    min_new_tokens: int = 0  # EOS and stop ids banned until this many tokens are out
    no_repeat_ngram_size: int = 0  # no n-gram of this size occurs twice
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # never produce these token sequences
    typical_p: float = 1.0  # locally typical sampling (transformers' TypicalLogitsWarper)
    logprobs: int | None = None  # report each token's log-probability and the N most likely alternatives
    # hold the output to a JSON schema, regex, choices or grammar: vLLM's StructuredOutputsParams object
    # ({"json": SCHEMA} | {"regex": R} | {"choice": [...]} | {"grammar": EBNF} | {"json_object": True}) for every
    # row, or a list of them (or None) with one per row
    structured_outputs: StructuredOutputs | tuple[StructuredOutputs | None, ...] | None = None
    eos_token_id: tuple[int, ...] | None = None  # transformers': these ids end a row instead of the model's EOS
    pad_token_id: int | None = None  # transformers': the id left padding is filled with (masked, never attended)

    def __post_init__(self) -> None:
        """Every field typed and ranged, named as the keyword (a server request's field or a CLI option maps to it).

        Raises:
            RuntimeShapeError: one line naming the first bad field, what was expected and what was found.
        """
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise RuntimeShapeError(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.temperature is None:
            object.__setattr__(self, "temperature", 1.0 if self.do_sample else 0.0)
        for name, low, high, what in _INTEGERS:
            value = getattr(self, name)
            if value is None and name in ("seed", "logprobs"):
                continue
            if not _is_int(value) or not low <= value <= high:
                raise RuntimeShapeError(f"{name} must be {what}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name, ok, what in _REALS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
                raise RuntimeShapeError(f"{name} must be {what}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.do_sample is True and self.temperature == 0:
            raise RuntimeShapeError("do_sample=True needs temperature > 0 (temperature 0 is greedy decoding)")
        if not isinstance(self.ignore_eos, bool):
            raise RuntimeShapeError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        words = self.bad_words_ids
        if isinstance(words, (str, bytes)) or not isinstance(words, (list, tuple)):
            raise RuntimeShapeError(f"bad_words_ids must be lists of token ids, got {words!r:.80}")
        words = tuple(_token_ids("bad_words_ids", w) for w in words)
        if any(not w for w in words):
            raise RuntimeShapeError("bad_words_ids must not contain an empty list")
        object.__setattr__(self, "bad_words_ids", words)
        strings = self.stop_strings
        if isinstance(strings, (str, bytes)) or not isinstance(strings, (list, tuple)) or \
                not all(isinstance(x, str) for x in strings):
            raise RuntimeShapeError(f"stop_strings must be a list of strings, got {strings!r:.80}")
        if any(not x for x in strings):
            raise RuntimeShapeError("stop_strings must not contain an empty string")
        object.__setattr__(self, "stop_strings", tuple(strings))
        specs = self.structured_outputs
        if isinstance(specs, (list, tuple)):  # one per row
            if not specs:
                raise RuntimeShapeError("structured_outputs must be an object, or a non-empty list with one per prompt")
            specs = tuple(StructuredOutputs.parse(s) for s in specs)
            specs = specs if any(s is not None for s in specs) else None
        object.__setattr__(self, "structured_outputs", StructuredOutputs.parse(specs) if not isinstance(specs, tuple)
                           else specs)
        if self.structured_outputs is not None and (self.bad_words_ids or self.no_repeat_ngram_size):
            raise RuntimeShapeError("structured_outputs do not combine with bad_words_ids or no_repeat_ngram_size "
                                    "(they could ban every token the grammar allows)")
        if self.eos_token_id is not None:  # an int or a list, as transformers takes it
            eos = self.eos_token_id
            object.__setattr__(self, "eos_token_id", _token_ids("eos_token_id", [eos] if _is_int(eos) else eos))
        if self.pad_token_id is not None:
            pad = self.pad_token_id
            pad = _token_ids("pad_token_id", [pad] if _is_int(pad) else pad)
            if len(pad) != 1:
                raise RuntimeShapeError(f"pad_token_id must be one token id, got {self.pad_token_id!r:.80}")
            object.__setattr__(self, "pad_token_id", pad[0])

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.temperature == 0

    def stops(self, model_eos: int | None) -> set[int]:
        """The ids that end a row: stop_token_ids, and the EOS (`eos_token_id` if given, else the model's) unless
        ignore_eos."""
        stops = set(self.stop_token_ids)
        if not self.ignore_eos:
            stops |= set(self.eos_token_id) if self.eos_token_id is not None else \
                ({model_eos} if model_eos is not None else set())
        return stops

    def pad(self, model_eos: int | None) -> int:
        """The left padding id: pad_token_id, else the model's EOS, else 0."""
        return self.pad_token_id if self.pad_token_id is not None else (0 if model_eos is None else model_eos)


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' logits divided by the penalty when
    positive, multiplied when negative."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, tokens in enumerate(seen):
        tokens = np.unique(tokens)
        values = logits[row, tokens]
        logits[row, tokens] = np.where(values < 0, values * penalty, values / penalty)
    return logits


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper: drop the tokens whose ascending cumulative probability is <= 1 - p,
    always keeping the most likely one."""
    if p >= 1.0:
        return logits
    kept = np.isfinite(logits)
    if kept.sum(axis=-1).max() * 4 <= logits.shape[-1]:  # after top-k: sort only the survivors of each row
        out = np.full_like(logits, -np.inf)
        for row in range(len(logits)):
            idx = np.flatnonzero(kept[row])  # ascending, so the stable sort breaks ties as on the whole row
            out[row, idx] = _top_p_rows(logits[row, idx][None], p)[0]
        return out
    return _top_p_rows(logits, p)


def _top_p_rows(logits: np.ndarray, p: float) -> np.ndarray:
    order = np.argsort(logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits), axis=-1)
    remove_sorted = cum <= 1 - p
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def apply_no_repeat_ngram(logits: np.ndarray, seen: list[np.ndarray], n: int) -> np.ndarray:
    """transformers' NoRepeatNGramLogitsProcessor: ban every token that would repeat an n-gram of the row."""
    if n <= 0:
        return logits
    for row, tokens in enumerate(seen):
        tokens = [int(t) for t in tokens]
        if len(tokens) + 1 < n:
            continue
        prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
        banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]
        logits[row, banned] = -np.inf
    return logits


def apply_bad_words(logits: np.ndarray, seen: list[np.ndarray], words: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """transformers' NoBadWordsLogitsProcessor: ban a word's last token when the row ends with the rest of it."""
    if not words:
        return logits
    for row, tokens in enumerate(seen):
        tail = [int(t) for t in tokens]
        for word in words:
            if len(word) == 1 or (len(tail) >= len(word) - 1 and tuple(tail[len(tail) - len(word) + 1:]) == word[:-1]):
                logits[row, word[-1]] = -np.inf
    return logits


def apply_typical_p(logits: np.ndarray, mass: float) -> np.ndarray:
    """transformers' TypicalLogitsWarper (min_tokens_to_keep 1)."""
    if mass >= 1.0:
        return logits
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    p = np.exp(logp)
    entropy = -np.nansum(logp * p, axis=-1, keepdims=True)
    shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
    last = np.minimum((cum < mass).sum(axis=-1), logits.shape[-1] - 1)
    cutoff = np.take_along_axis(np.take_along_axis(shifted, order, axis=-1), last[:, None], axis=-1)
    return np.where(shifted > cutoff, -np.inf, logits)


def processes(options: GenerationOptions) -> bool:
    """Whether `process` may change any logit (else greedy's token is the plain argmax of the logits)."""
    return bool(options.repetition_penalty != 1.0 or options.no_repeat_ngram_size or options.bad_words_ids or
                options.min_new_tokens)


def process(logits: np.ndarray, seen: list[np.ndarray], options: GenerationOptions,
            generated: list[int] | None = None, stop_ids=()) -> np.ndarray:
    """The logits processors, in transformers' order: repetition penalty, no-repeat n-grams, bad words, minimum
    new tokens (stop ids banned while a row has fewer than `min_new_tokens` new tokens)."""
    logits = apply_repetition_penalty(np.asarray(logits, np.float64), seen, options.repetition_penalty)
    if options.no_repeat_ngram_size or options.bad_words_ids or (options.min_new_tokens and generated is not None):
        logits = logits.copy()
    logits = apply_no_repeat_ngram(logits, seen, options.no_repeat_ngram_size)
    logits = apply_bad_words(logits, seen, options.bad_words_ids)
    if options.min_new_tokens and generated is not None and stop_ids:
        short = np.array([g < options.min_new_tokens for g in generated])
        logits[np.ix_(short, list(stop_ids))] = -np.inf
    return logits


def token_probs(logits: np.ndarray, seen: list[np.ndarray], options: GenerationOptions,
                generated: list[int] | None = None, stop_ids=()) -> np.ndarray:
    """The distribution [B, V] that sampling draws from (greedy: the softmax of the processed logits, whose
    argmax is the greedy token); speculative decoding compares the target's and the draft's."""
    logits = process(logits, seen, options, generated, stop_ids)
    if options.greedy:
        return softmax(logits)
    logits = apply_top_p(apply_top_k(logits / options.temperature, options.top_k), options.top_p)
    return softmax(apply_typical_p(logits, options.typical_p))


def next_tokens(logits: np.ndarray, seen: list[np.ndarray], options: GenerationOptions,
                rng: np.random.Generator, generated: list[int] | None = None, stop_ids=()) -> np.ndarray:
    """One token per row from last-position logits [B, V]; `generated` (new tokens per row so far) and
    `stop_ids` serve `min_new_tokens`."""
    if options.greedy:
        if not processes(options):  # plain greedy: the argmax as it comes (exact; no copy)
            return np.asarray(logits).argmax(axis=-1)
        return process(logits, seen, options, generated, stop_ids).argmax(axis=-1)
    if not processes(options) and options.typical_p >= 1.0:
        logits = np.asarray(logits)
        if 0 < options.top_k < logits.shape[-1]:
            return _sample_top_k(logits, options, rng)
        if options.top_p >= 1.0:
            return _sample_tempered(logits, options.temperature, rng)
    probs = token_probs(logits, seen, options, generated, stop_ids)
    return draw(probs, rng)


def checks_first(options: GenerationOptions) -> bool:
    """Whether a constrained row may take its unconstrained choice when the grammar allows it, exactly: greedy
    (with any processor: masking and the processors commute, and an argmax the mask allows is the masked argmax),
    and sampling from the whole tempered distribution (a draw the grammar allows, kept, is a draw from the
    distribution restricted to what it allows: rejection sampling). Not top-k, top-p or typical-p, whose kept
    set depends on the mask."""
    return options.greedy or (options.top_k == 0 and options.top_p >= 1.0 and options.typical_p >= 1.0)


RETRIES = 4  # further candidates a refused row tries (the next draws, the next-best tokens) before it is masked


def constrained_next_tokens(logits: np.ndarray, constraints, seen: list[np.ndarray], options: GenerationOptions,
                            rng: np.random.Generator | None, generated: list[int] | None = None,
                            stop_ids=(), in_place: bool = False) -> np.ndarray:
    """`next_tokens` with each row held to its constraint (None: unconstrained); `logits` left as they are, unless
    `in_place` (a caller that keeps no unmasked logits: the rows that are masked are masked in it, no copy).

    Where it is exact (`checks_first`), the rows' unconstrained choices come first and a constrained row keeps
    its choice when the grammar allows it (one llguidance check of one token, microseconds); a refused row tries
    up to RETRIES more candidates from the same work -- further draws from the same tempered distribution, or
    greedy's next-best tokens in order -- and only then is masked and chosen among the tokens its mask allows
    (as llama.cpp samples under a grammar). Each is exact: a draw kept because the grammar allows it is a draw from
    the distribution restricted to what it allows, and the first allowed of the best tokens is the masked
    argmax. Elsewhere (top-k, top-p, typical-p) every constrained row is masked first.

    Where every row's grammar forces its next token (`Constraint.forced`: the mask is that one token) the tokens
    are taken as they are, nothing drawn -- whatever the options, the masked distribution holds that token alone
    (processors that would ban it too leave nothing else to choose). One row alone (batch 1, or a scheduler's
    request) thus draws only where it has a choice, whichever loop runs it."""
    rows = [j for j, c in enumerate(constraints) if c is not None and not c.finished]
    if not rows:
        return next_tokens(logits, seen, options, rng, generated, stop_ids)
    if len(rows) == len(logits) and all(constraints[j].forced() >= 0 for j in rows):
        return np.array([constraints[j].forced() for j in rows], np.int64)
    if not checks_first(options):
        return next_tokens(masked(logits, constraints, copy=not in_place), seen, options, rng, generated, stop_ids)
    logits = np.asarray(logits)
    direct = not processes(options)  # the logits as they are: plain greedy, or the whole tempered distribution
    tempered = direct and not options.greedy
    if tempered:
        blocks, ends = _tempered_table(logits, options.temperature)
        chosen = _draw_table(blocks, ends, rng.random(len(logits)))
    else:
        chosen = np.array(next_tokens(logits, seen, options, rng, generated, stop_ids), np.int64)
    refused = []  # rows left to mask and choose again through the processors
    for j in rows:
        c = constraints[j]
        if c.accepts(int(chosen[j])):
            continue
        forced = c.forced()
        if forced >= 0:  # the one token allowed
            chosen[j] = forced
        elif not direct:
            refused.append(j)
        else:
            if tempered:
                candidates = (_draw_table(blocks[j:j + 1], ends[j:j + 1], rng.random(1))[0] for _ in range(RETRIES))
            else:
                candidates = top_indices(logits[j:j + 1], RETRIES + 1)[0, 1:]  # [0] was the choice
            found = next((int(t) for t in candidates if c.accepts(int(t))), None)
            chosen[j] = found if found is not None else \
                _choose_among(logits[j], np.flatnonzero(~c.banned()[:logits.shape[-1]]), options, rng)
    if refused:
        again = masked(logits[refused], [constraints[j] for j in refused], copy=False)  # a copy already
        chosen[refused] = next_tokens(again, [seen[j] for j in refused], options, rng,
                                      None if generated is None else [generated[j] for j in refused], stop_ids)
    return chosen


def _choose_among(logits: np.ndarray, allowed: np.ndarray, options: GenerationOptions, rng) -> int:
    """Greedy's or tempered sampling's token from one row's logits [V] restricted to `allowed` (ascending ids):
    the masked argmax (ties: the lower id), or a draw from the masked distribution -- working on the allowed
    tokens alone (a forced byte allows one or two of 50k)."""
    if not len(allowed):
        return int(np.asarray(logits).argmax())  # nothing allowed: the grammar's bug, reported when it advances
    kept = logits[allowed].astype(np.float64)
    if options.greedy:
        return int(allowed[kept.argmax()])
    cdf = np.cumsum(np.exp((kept - kept.max()) / options.temperature))
    return int(allowed[min(int((cdf <= rng.random() * cdf[-1]).sum()), len(allowed) - 1)])


BLOCK = 64  # `_sample_tempered`'s two-level inverse CDF: block sums first, then one block's cumulative sum
_ONES = np.ones(BLOCK, np.float32)  # a block's sum as a matrix-vector product


def _sample_tempered(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """`draw(softmax(logits / temperature))` without normalising or cumulating the whole vocabulary: the
    exponentials unnormalised (float32; their running sums float64), the inverse CDF found per block of BLOCK tokens, then
    inside one block. The same draw from the same uniform, up to the rounding of the partial sums; never a token
    of probability 0 (-inf logits: a constraint's or a processor's bans)."""
    blocks, ends = _tempered_table(logits, temperature)
    return _draw_table(blocks, ends, rng.random(len(logits)))


def _tempered_table(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """`_sample_tempered`'s work that does not depend on the uniform: the unnormalised exponentials by block
    [B, NB, BLOCK] and the blocks' cumulative sums [B, NB]. The exponentials are float32 (of logits less their
    maximum: in (0, 1], a relative error of 1e-7 against float64's, at a third of the time), the block sums one
    matrix-vector product, their cumulative sums float64."""
    b, v = logits.shape
    nb = -(-v // BLOCK)
    e = np.zeros((b, nb * BLOCK), np.float32)
    np.subtract(logits, logits.max(axis=-1, keepdims=True), out=e[:, :v], dtype=np.float32)
    if temperature != 1.0:
        e[:, :v] *= np.float32(1.0 / temperature)
    np.exp(e[:, :v], out=e[:, :v])
    blocks = e.reshape(b, nb, BLOCK)
    return blocks, np.cumsum(blocks @ _ONES, axis=-1, dtype=np.float64)


def _draw_table(blocks: np.ndarray, ends: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One token per row from `_tempered_table`'s table and uniforms `u` [B] in [0, 1)."""
    nb = ends.shape[-1]
    target = u * ends[:, -1]
    blk = np.minimum((ends <= target[:, None]).sum(axis=-1), nb - 1)  # the first block ending past the target
    rows = np.arange(len(ends))
    prior = np.where(blk > 0, ends[rows, blk - 1], 0.0)  # <= target
    inside = blocks[rows, blk]
    j = ((prior[:, None] + np.cumsum(inside, axis=-1, dtype=np.float64)) <= target[:, None]).sum(axis=-1)
    for r in np.flatnonzero(j >= BLOCK):  # rounding put the target past the block's own sum: its last token
        j[r] = np.flatnonzero(inside[r] > 0)[-1]
    return blk * BLOCK + j


def _sample_top_k(logits: np.ndarray, options: GenerationOptions, rng: np.random.Generator) -> np.ndarray:
    """Top-k (then top-p) sampling on the survivors only -- the tokens at or above the k-th value (ties kept, as
    transformers keeps them), in index order, so the draw is the one `draw` makes on the whole row."""
    kth = _kth_largest(logits, options.top_k)
    u = rng.random(len(logits))
    chosen = np.zeros(len(logits), np.int64)
    for r in range(len(logits)):
        idx = np.flatnonzero(logits[r] >= kth[r])
        kept = logits[r, idx].astype(np.float64)[None] / options.temperature
        cdf = np.cumsum(softmax(apply_top_p(kept, options.top_p))[0])
        chosen[r] = idx[min(int((cdf <= u[r] * cdf[-1]).sum()), len(idx) - 1)]
    return chosen


def _kth_largest(x: np.ndarray, k: int) -> np.ndarray:
    """Per row the k-th largest value of [B, V] `x` (np.partition's, exactly), from the candidates at or above
    the k-th largest of the block maxima (k distinct elements, so no higher than the answer): two passes over
    the row and a partition of a few hundred values, not of the whole vocabulary."""
    b, v = x.shape
    nb = v // BLOCK
    if nb < 4 * k:
        return np.partition(x, -k, axis=-1)[:, -k]
    peaks = x[:, :nb * BLOCK].reshape(b, nb, BLOCK).max(axis=-1)
    floor = np.partition(peaks, -k, axis=-1)[:, -k]
    out = np.empty(b, x.dtype)
    for r in range(b):
        candidates = x[r][x[r] >= floor[r]]
        out[r] = np.partition(candidates, -k)[-k]
    return out


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from probabilities [B, V] (inverse CDF, one uniform draw per row)."""
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draws).sum(axis=-1), probs.shape[-1] - 1)


def top_indices(x: np.ndarray, n: int) -> np.ndarray:
    """Per row, the indices of the `n` largest values, largest first (ties: lower index first), [R, n]; a partial
    selection, linear in the vocabulary (a full sort of 50k logits per token is what it replaces)."""
    if n <= 0:
        return np.zeros((x.shape[0], 0), np.int64)
    n = min(n, x.shape[-1])
    if n == 1:  # argmax: the first of the largest
        return np.argmax(x, axis=-1)[:, None]
    part = np.argpartition(-x, n - 1, axis=-1)[:, :n]
    vals = np.take_along_axis(x, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def scored_logprobs(logits: np.ndarray, chosen, top: int) -> list:
    """Per row of raw logits [n, V]: (log p(chosen), [(token, log p)] of the `top` most likely). log p = logit -
    logsumexp (the sum in float64), read at the chosen and the top tokens only: no [n, V] array of
    log-probabilities (the top tokens are the top logits)."""
    x = np.asarray(logits, np.float32)
    n = len(x)
    peak = x.max(axis=-1, keepdims=True)
    lse = peak[:, 0].astype(np.float64) + np.log(np.exp(x - peak).sum(axis=-1, dtype=np.float64))  # [n]
    scored = x[np.arange(n), np.asarray(chosen, np.int64)].astype(np.float64) - lse
    best = top_indices(x, top)
    values = np.take_along_axis(x, best, axis=-1).astype(np.float64) - lse[:, None]
    return [(float(c), list(zip(b, v))) for c, b, v in zip(scored.tolist(), best.tolist(), values.tolist())]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
