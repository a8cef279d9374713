"""`Generator`: text generation over any `Session` -- the loop is written once: prompt step, then decode
steps, each row stopping on its own (EOS, stop ids, stop strings, max tokens)."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import ArtifactError, GrammarError, RuntimeShapeError
from neoxrt.manifest import ORT_SESSION_CONFIG, read_manifest
from neoxrt.runtime.beam import BeamOptions, beam_search
from neoxrt.runtime.sampling import GenerationOptions, constrained_next_tokens, log_softmax, scored_logprobs
from neoxrt.runtime.session import Session
from neoxrt.runtime.speculative import SpeculativeOptions, speculative_loop
from neoxrt.runtime.structured import FINISHED, Constraint, Grammars

SPECULATIVE_KEYS = ("num_draft_tokens", "prompt_lookup_tokens", "max_ngram")
BEAM_KEYS = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass
class TokenEvent:
    """One streamed token: which row, its id, and the text it completes (may be '' mid-character)."""

    row: int
    token_id: int
    text: str
    finish_reason: str | None  # None while the row goes on; else length, stop_token, stop_string or grammar (complete)
    logprob: float | None = None  # with logprobs=N: log p(token) under the model (log_softmax of its logits)
    top_logprobs: list[tuple[int, float]] | None = None  # and the N most likely tokens with theirs


@dataclass
class GenerationResult:
    ids: list[list[int]]  # new tokens per row (prompt excluded)
    text: list[str] | None  # decoded new text per row, None without a tokenizer
    finish_reasons: list[str]
    logprobs: list[list[dict]] | None = None  # with logprobs=N: per row, per token {token, logprob, top}


def token_logprobs(logits: np.ndarray, chosen: np.ndarray, top: int | None) -> list | None:
    """Per row (log p(chosen), [(token, log p)] of the `top` most likely), from raw logits [B, V]; None when off."""
    return None if top is None else scored_logprobs(logits, chosen, top)


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids) int64 [B, width] for a left-padded batch; positions count
    real tokens only, as transformers makes them (padding positions are 1, never attended)."""
    width = max(len(r) for r in rows)
    ids = np.array([[pad_id] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    pos = np.where(mask == 1, mask.cumsum(-1) - 1, 1).astype(np.int64)
    return ids, mask, pos


class TextSoFar:
    """A row's generated text, decoded incrementally: the tokens before `offset` were decoded once into `done`
    (which ends on a whole character), and each step decodes only the tokens after them -- not every token
    generated so far, which grows with the length (50 us a step at 256 tokens, more later)."""

    __slots__ = ("done", "offset", "text")

    def __init__(self) -> None:
        self.done, self.offset, self.text = "", 0, ""  # text: what was emitted so far


class RowBook:
    """Per prompt row: the tokens seen and generated, the text emitted so far, and when the row is finished --
    what every generation loop (plain, speculative) keeps the same way."""

    def __init__(self, gen: Generator, rows: list[list[int]], options: GenerationOptions):
        self.gen, self.options = gen, options
        self.stops = options.stops(gen.eos_token_id)
        self.constraints = gen.constraints(len(rows), options)  # per row, None where unconstrained
        self.seen = [np.array(r, np.int64) for r in rows]
        self.generated: list[list[int]] = [[] for _ in rows]
        self.emitted = [TextSoFar() for _ in rows]

    def emit(self, row: int, token: int, logprob: float | None = None, top=None) -> TokenEvent:
        """Record `token` for `row` (advancing its constraint); the event says whether the row is finished (stop
        token, length, stop string, grammar complete)."""
        self.generated[row].append(token)
        self.seen[row] = np.append(self.seen[row], token)
        constraint = self.constraints[row]
        if constraint is not None:
            constraint.advance(token)
        piece, reason = self.gen._piece(row, self.generated[row], self.emitted, self.options)
        why = finish_reason(token, reason, self.stops, constraint, len(self.generated[row]), self.options)
        if why is not None and reason != "stop_string":  # the row ends: what was held back goes out
            piece += self.gen._release(row, self.generated[row], self.emitted)
        return TokenEvent(int(row), token, piece, why, logprob, top)


def _take_forced(book: RowBook):
    """Emit the tokens row 0's grammar forces from here (`Constraint.forced`: what sampling under its mask would
    take, with no draw, whatever the options), until it has a choice again; yields their events and returns them
    (None: the row finished). Jump-forward decoding: they are fed to the model together, in one step."""
    constraint, taken = book.constraints[0], []
    while not constraint.finished and constraint.forced() >= 0:
        event = book.emit(0, constraint.forced())
        yield event
        if event.finish_reason:
            return None
        taken.append(event.token_id)
    return taken


def finish_reason(token: int, reason: str | None, stops: set[int], constraint, generated: int,
                  options: GenerationOptions) -> str | None:
    """Why a row ends with `token` (None: it goes on): a stop string (`reason`), a stop token, its grammar complete,
    or max_new_tokens reached."""
    if token in stops:
        return "stop_token"
    if reason is None and constraint is not None and constraint.finished:
        return FINISHED
    if generated >= options.max_new_tokens:
        return reason or "length"
    return reason


class Generator:
    """Runs a neoxrt artifact. Use `Generator.from_artifacts(path)`."""

    def __init__(self, session: Session, manifest: dict, tokenizer=None):
        self.session = session
        self.manifest = manifest
        config = self.config = manifest["config"]
        self.tokenizer = tokenizer
        self.draft: Generator | None = None
        self.defaults: dict = {}  # from the artifact's generation_config.json (transformers' keys), see load
        self.spec_stats: dict | None = None  # rounds / drafted / accepted of the last speculative generation
        self.eos_token_id = config.get("eos_token_id")
        self.max_positions = int(config["max_position_embeddings"])
        self._grammars: Grammars | None = None

    @classmethod
    def from_artifacts(cls, path, backend: str = "auto", providers=None, threads: int | None = None,
                       verify: bool = True, draft=None) -> Generator:
        """Load an artifact folder written by `neoxrt export` (or calibrate / build).

        Args:
            draft: an artifact folder (or a loaded `Generator`) with the same tokenizer and vocabulary, e.g. the
                INT8 artifact of the same model: generation then guesses tokens with it and checks them with
                this model (speculative decoding; the tokens are this model's own).

        Raises:
            ArtifactError: missing folder or files, manifest mismatch (files, toolkit version, I/O), a draft
                with another vocabulary or tokenizer.
        """
        generator = cls._load(path, backend, providers, threads, verify)
        if draft is not None:
            generator.attach_draft(draft if isinstance(draft, Generator) else
                                   cls._load(draft, backend, providers, threads, verify))
        return generator

    def attach_draft(self, draft: Generator) -> None:
        """Use `draft` to guess tokens (speculative decoding).

        Raises:
            ArtifactError: its vocabulary or tokenizer differs from this model's, or this model's graph returns
                the last position's logits only (the verify step needs every position's).
        """
        if int(draft.config["vocab_size"]) != int(self.config["vocab_size"]):
            raise ArtifactError(f"draft vocabulary has {draft.config['vocab_size']} tokens, the model's has "
                                f"{self.config['vocab_size']}; a draft needs the same tokenizer and vocabulary")
        mine, theirs = (m.get("files", {}).get(io.TOKENIZER_FILE) for m in (self.manifest, draft.manifest))
        if mine != theirs:
            raise ArtifactError(f"draft tokenizer.json differs from the model's (sha256 {str(theirs)[:12]} vs "
                                f"{str(mine)[:12]}); a draft needs the same tokenizer")
        self._check_all_logits()
        self.draft = draft

    def _check_all_logits(self, why: str = "speculative decoding verifies every guessed token") -> None:
        spec = next(o for o in self.session.io_spec()[1] if o.name == io.LOGITS)
        if io.logits_rows(spec, 2) != 2:
            raise ArtifactError(f"{why}: export the model with --logits all (this artifact returns the last "
                                "position's logits only)")

    @classmethod
    def _load(cls, path, backend: str, providers, threads: int | None, verify: bool) -> Generator:
        path = Path(path)
        if backend not in BACKENDS:
            raise ArtifactError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        manifest = read_manifest(path, ("export", "calibrate", "build"), verify_files=verify)
        if manifest.get("task", io.TEXT_GENERATION) != io.TEXT_GENERATION:
            raise ArtifactError(f"artifact {path} is a {manifest['task']} export; generation needs a "
                                f"{io.TEXT_GENERATION} export (run heads with neoxrt.runtime.Classifier)")
        engine = manifest["stage"] == "build"
        if backend != "auto" and engine != (backend == "tensorrt"):
            runs = "engines (neoxrt build)" if backend == "tensorrt" else "ONNX artifacts"
            raise ArtifactError(f"artifact {path} is stage {manifest['stage']}; backend {backend!r} runs {runs}")
        if engine:
            from neoxrt.runtime.trt_session import TrtSession

            session = TrtSession(path, manifest)
        else:
            session = _ort_session_for(path, manifest, providers, threads)
        _check_io(session, manifest, path)
        tokenizer = None
        if (path / io.TOKENIZER_FILE).is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path / io.TOKENIZER_FILE))
        generator = cls(session, manifest, tokenizer)
        defaults = generation_defaults(path / io.GENERATION_CONFIG_FILE)
        stops = tuple(t for t in defaults.pop("stop_token_ids", ()) if t != generator.eos_token_id)
        generator.defaults = {**defaults, **({"stop_token_ids": stops} if stops else {})}
        return generator

    # -- input handling ---------------------------------------------------------------------------------
    def encode(self, prompts) -> list[list[int]]:
        """Prompts as token ids: a string, a list of strings, or a list of id lists."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise RuntimeShapeError("no prompt given")
        rows = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ArtifactError("text prompt given but the artifact has no tokenizer.json; pass token ids")
                ids = self.tokenizer.encode(prompt).ids
            elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
                ids = [int(t) for t in prompt]
            else:
                raise RuntimeShapeError(f"prompt must be a string or a list of token ids, got {prompt!r:.80}")
            if not ids:
                raise RuntimeShapeError("empty prompt: expected at least one token")
            bad = [t for t in ids if not 0 <= t < int(self.config["vocab_size"])]
            if bad:
                raise RuntimeShapeError(f"token id {bad[0]} outside the vocabulary [0, {self.config['vocab_size']})")
            rows.append(ids)
        return rows

    # -- structured outputs ---------------------------------------------------------------------------
    @property
    def grammars(self) -> Grammars:
        """The compiled grammars of this model's tokenizer (made on first use).

        Raises:
            GrammarError: the artifact has no tokenizer.json (a grammar constrains text).
        """
        if self._grammars is None:
            if self.tokenizer is None:
                raise GrammarError("structured outputs need the artifact's tokenizer.json (a grammar constrains text)")
            self._grammars = Grammars(self.tokenizer.to_str(), int(self.config["vocab_size"]), self.eos_token_id)
        return self._grammars

    def constraints(self, rows: int, options: GenerationOptions) -> list[Constraint | None]:
        """One fresh `Constraint` per row for `options.structured_outputs` (each spec compiled once; a list gives
        one per row, None where a row is unconstrained), or Nones.

        Raises:
            GrammarError: the engine refused a spec, or it took too long to compile.
            RuntimeShapeError: a list of specs that is not one per row.
        """
        specs = options.structured_outputs
        if specs is None:
            return [None] * rows
        if not isinstance(specs, tuple):
            specs = (specs,) * rows
        elif len(specs) != rows:
            raise RuntimeShapeError(f"structured_outputs holds {len(specs)} constraints; expected one per prompt ({rows})")
        return [None if spec is None else self.grammars.constraint(spec) for spec in specs]

    # -- generation -----------------------------------------------------------------------------------
    def stream(self, prompts, **kwargs) -> Iterator[TokenEvent]:
        """Yield tokens as they are produced (all rows interleaved). Keywords: `GenerationOptions`, and
        `SpeculativeOptions` (`num_draft_tokens` with a draft, `prompt_lookup_tokens`)."""
        rows = self.encode(prompts)
        kwargs = self._with_defaults(rows, kwargs, beams=False)
        for key in BEAM_KEYS:  # generate() has taken them; streaming is one sequence per prompt
            if key in kwargs and kwargs.pop(key) not in (1, 1.0, False):
                raise RuntimeShapeError(f"{key} needs generate() (beam search returns whole sequences); stream() "
                                        "produces one sequence per prompt")
        spec = SpeculativeOptions(**{k: kwargs.pop(k) for k in SPECULATIVE_KEYS if k in kwargs})
        options = GenerationOptions(**kwargs)
        self._check_length(rows, options)
        if self.draft is not None or spec.prompt_lookup_tokens:
            if (options.no_repeat_ngram_size or options.bad_words_ids or options.min_new_tokens or options.typical_p < 1
                    or options.logprobs is not None):
                raise RuntimeShapeError("speculative decoding takes temperature, top_k, top_p and repetition_penalty; "
                                        "not no_repeat_ngram_size, bad_words_ids, min_new_tokens, typical_p or logprobs")
            self._check_all_logits()
            draft = self.draft.session if self.draft is not None else None
            yield from speculative_loop(self, rows, options, spec, draft)
        else:
            yield from self._loop(rows, options)

    def generate(self, prompts, **kwargs) -> GenerationResult:
        """Generate for one prompt or a batch; returns new ids (and text when there is a tokenizer).

        Keywords: `GenerationOptions`, `SpeculativeOptions`, and beam search's `num_beams`, `length_penalty`,
        `early_stopping`, `num_return_sequences` (transformers' names and meaning; with sampling,
        `num_return_sequences` draws that many samples per prompt). Rows: prompt-major, `num_return_sequences`
        per prompt. `structured_outputs` holds every row to one constraint, or (a list) each prompt to its own.
        """
        rows = self.encode(prompts)
        kwargs = self._with_defaults(rows, kwargs)
        beam = BeamOptions(**{k: kwargs.pop(k) for k in BEAM_KEYS if k in kwargs})
        if beam.num_beams > 1:
            if kwargs.pop("prompt_lookup_tokens", 0) or self.draft is not None:
                raise RuntimeShapeError("beam search does not combine with speculative decoding (a draft or prompt lookup)")
            options = GenerationOptions(**{k: v for k, v in kwargs.items() if k not in SPECULATIVE_KEYS})
            if options.structured_outputs is not None:
                raise RuntimeShapeError("structured_outputs constrain greedy and sampled generation, not beam search "
                                        "(num_beams must be 1)")
            if options.logprobs is not None:
                raise RuntimeShapeError("logprobs are reported for greedy and sampled generation, not beam search")
            if options.stop_strings:
                raise RuntimeShapeError("stop_strings end greedy and sampled generation, not beam search (num_beams "
                                        "must be 1)")
            self._check_length(rows, options)
            ids = [seq for per_prompt in beam_search(self, rows, options, beam) for seq in per_prompt]
            text = [self.tokenizer.decode(r) for r in ids] if self.tokenizer is not None else None
            return GenerationResult(ids, text, ["beam"] * len(ids))
        if beam.num_return_sequences > 1:
            if GenerationOptions(**{k: v for k, v in kwargs.items() if k not in SPECULATIVE_KEYS}).greedy:
                raise RuntimeShapeError("num_return_sequences > 1 needs sampling (temperature > 0) or num_beams > 1: "
                                        "greedy decoding returns one sequence per prompt")
            rows = [r for r in rows for _ in range(beam.num_return_sequences)]
            specs = kwargs.get("structured_outputs")
            if isinstance(specs, (list, tuple)):  # one per prompt: each prompt's for each of its sequences
                if len(specs) * beam.num_return_sequences != len(rows):
                    raise RuntimeShapeError(f"structured_outputs holds {len(specs)} constraints; expected one per prompt "
                                            f"({len(rows) // beam.num_return_sequences})")
                kwargs["structured_outputs"] = [s for s in specs for _ in range(beam.num_return_sequences)]
        ids: list[list[int]] = [[] for _ in rows]
        reasons = ["length"] * len(rows)
        logprobs: list[list[dict]] | None = [[] for _ in rows] if kwargs.get("logprobs") is not None else None
        for event in self.stream(rows, **kwargs):
            ids[event.row].append(event.token_id)
            if logprobs is not None:
                logprobs[event.row].append({"token": event.token_id, "logprob": event.logprob, "top": event.top_logprobs})
            if event.finish_reason:
                reasons[event.row] = event.finish_reason
        stop_strings = tuple(kwargs.get("stop_strings", ()))
        text = None
        if self.tokenizer is not None:
            text = [self._truncate(self.tokenizer.decode(r), stop_strings) for r in ids]
        return GenerationResult(ids, text, reasons, logprobs)

    def _with_defaults(self, rows, kwargs: dict, beams: bool = True) -> dict:
        """The artifact's generation_config.json defaults under the caller's keywords; `max_length` (prompt +
        new tokens, transformers' meaning) becomes max_new_tokens for the longest prompt. A caller's temperature
        without do_sample keeps neoxrt's rule (temperature > 0 samples); stream() takes no beam defaults."""
        defaults = {k: v for k, v in self.defaults.items()
                    if not (k == "max_new_tokens" and "max_length" in kwargs)
                    and not (k == "do_sample" and "temperature" in kwargs)
                    and not (k == "stop_token_ids" and kwargs.get("ignore_eos"))
                    and (beams or k not in BEAM_KEYS)}
        kwargs = {**defaults, **kwargs}
        if "max_length" in kwargs:
            max_length = kwargs.pop("max_length")
            if not isinstance(max_length, numbers.Integral) or isinstance(max_length, bool):
                raise RuntimeShapeError(f"max_length must be an integer, got {max_length!r}")
            if "max_new_tokens" not in kwargs or "max_new_tokens" in self.defaults:
                kwargs["max_new_tokens"] = int(max_length) - max(len(r) for r in rows)
        return kwargs

    def _check_length(self, rows, options: GenerationOptions) -> None:
        longest = max(len(r) for r in rows)
        if longest + options.max_new_tokens > self.max_positions:
            raise RuntimeShapeError(
                f"prompt ({longest} tokens) + max_new_tokens ({options.max_new_tokens}) exceeds the model's "
                f"context of {self.max_positions} positions"
            )

    @staticmethod
    def _truncate(text: str, stop_strings: tuple[str, ...]) -> str:
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def _loop(self, rows: list[list[int]], options: GenerationOptions) -> Iterator[TokenEvent]:
        book = RowBook(self, rows, options)
        ids, mask, pos = left_pad(rows, options.pad(self.eos_token_id))
        decoder = self.session.decoder(len(rows), ids.shape[1] + options.max_new_tokens)
        rng = np.random.default_rng(options.seed)
        live = np.arange(len(rows))  # original row index of each decoder row
        # one constrained row: the tokens its grammar forces go into one step with the token before them
        # (ONNX Runtime, and static-cache TensorRT engines, whose prompt profile takes a step of several tokens after
        # a past; a dynamic-cache engine takes those only in its verify profile)
        jump = (len(rows) == 1 and book.constraints[0] is not None and options.logprobs is None
                and (getattr(self.session, "verify_tokens", None) is None or getattr(self.session, "static", False)))
        if jump:
            taken = yield from _take_forced(book)
            if taken is None:
                return
            if taken:  # with the prompt
                ahead = np.array([taken], np.int64)
                ids, mask = np.concatenate([ids, ahead], axis=1), np.concatenate([mask, np.ones_like(ahead)], axis=1)
                pos = np.concatenate([pos, pos[:, -1:] + 1 + np.arange(len(taken))], axis=1)
        logits = decoder.step(ids, mask, pos)
        for _ in range(options.max_new_tokens):
            chosen = constrained_next_tokens(logits, [book.constraints[r] for r in live], [book.seen[r] for r in live],
                                             options, rng, [len(book.generated[r]) for r in live], sorted(book.stops),
                                             in_place=options.logprobs is None)
            finished = np.zeros(len(live), bool)
            scored = token_logprobs(logits, chosen, options.logprobs)
            for j, row in enumerate(live):
                event = book.emit(row, int(chosen[j]), *(scored[j] if scored else (None, None)))
                finished[j] = event.finish_reason is not None
                yield event
            if finished.all():
                return
            keep = np.flatnonzero(~finished)
            nxt = chosen[keep][:, None].astype(np.int64)
            if len(keep) < len(live):
                decoder.keep_rows(keep)
                mask, pos, live = mask[keep], pos[keep], live[keep]
            if jump:
                taken = yield from _take_forced(book)
                if taken is None:
                    return
                nxt = np.array([[int(nxt[0, 0]), *taken]], np.int64)
            mask = np.concatenate([mask, np.ones(nxt.shape, np.int64)], axis=1)
            pos = pos[:, -1:] + 1 + np.arange(nxt.shape[1])
            logits = decoder.step(nxt, mask, pos)

    def prompt_logprobs(self, prompts) -> list[list[float | None]]:
        """log p(token | the tokens before it) for every prompt token (None for the first): what evaluation
        harnesses score continuations with (OpenAI's `echo`). Needs a graph with every position's logits.

        Raises:
            ArtifactError: the graph returns the last position's logits only.
        """
        self._check_all_logits("prompt log-probabilities score every prompt token")
        rows = self.encode(prompts)
        ids, mask, pos = left_pad(rows, 0 if self.eos_token_id is None else self.eos_token_id)
        logits = self.session.decoder(len(rows), ids.shape[1]).step_all(ids, mask, pos)
        out = []
        for b, row in enumerate(rows):
            start = ids.shape[1] - len(row)
            logp = log_softmax(np.asarray(logits[b, start:-1], np.float64))
            out.append([None] + [float(logp[t, tok]) for t, tok in enumerate(row[1:])])
        return out

    @property
    def _byte_level(self) -> bool:
        """Whether the tokenizer decodes byte-level BPE (GPT-NeoX's), where text can be decoded piecewise."""
        return type(getattr(self.tokenizer, "decoder", None)).__name__ == "ByteLevel"

    def _piece(self, row, tokens, emitted, options) -> tuple[str, str | None]:
        """The new text of `row` (held back while a character is incomplete) and 'stop_string' if one
        appeared."""
        if self.tokenizer is None:
            return "", None
        state = emitted[row]
        text = self._decoded(state, tokens)
        stops = options.stop_strings
        cut = min((text.find(s) for s in stops if s in text), default=-1) if stops else -1
        if cut >= 0:  # what comes before the stop string and was held back goes out, the stop string does not
            before = text[:cut]
            piece = before[len(state.text):] if before.startswith(state.text) else ""
            state.text = before if before.startswith(state.text) else state.text
            return piece, "stop_string"
        if text.endswith("\ufffd"):  # a character still incomplete: held back
            return "", None
        # a tail that may be the start of a stop string is held back until the next tokens tell (as vLLM does)
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0) if stops else 0
        visible = text[:len(text) - held]
        piece = visible[len(state.text):] if visible.startswith(state.text) else visible
        state.text, state.done = visible, text
        state.offset = len(tokens)
        return piece, None

    def _decoded(self, state: TextSoFar, tokens) -> str:
        """The row's whole text so far: byte-level BPE decodes only the tokens after those decoded once (the bytes
        of whole characters decode the same on their own); other tokenizers decode every token."""
        if self._byte_level:
            return state.done + self.tokenizer.decode(tokens[state.offset:])
        return self.tokenizer.decode(tokens)

    def _release(self, row, tokens, emitted) -> str:
        """What `_piece` held back when the row ends otherwise than by a stop string: a tail that might have begun
        one, and the text of an incomplete last character (decoded as the non-streamed text decodes it)."""
        if self.tokenizer is None:
            return ""
        state = emitted[row]
        text = self._decoded(state, tokens)
        piece = text[len(state.text):] if text.startswith(state.text) else ""
        state.text = state.done = text
        state.offset = len(tokens)
        return piece


# generation_config.json keys (transformers) -> generate() keywords; others (pad/bos ids, flags) are not ours
_GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
                    "no_repeat_ngram_size", "bad_words_ids", "min_new_tokens", "max_new_tokens", "max_length",
                    "num_beams", "length_penalty", "early_stopping", "num_return_sequences")


def generation_defaults(path: Path) -> dict:
    """generate() defaults from a generation_config.json (transformers' names); {} when there is none.

    Raises:
        ArtifactError: the file is not a JSON object.
    """
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(data).__name__}")
    defaults = {k: data[k] for k in _GENERATION_KEYS if data.get(k) is not None}
    if not data.get("do_sample"):  # transformers ignores the sampling knobs when do_sample is false
        for key in ("temperature", "top_k", "top_p", "typical_p"):
            defaults.pop(key, None)
    if data.get("max_length") == 20 and "max_new_tokens" not in data:  # transformers' placeholder default
        defaults.pop("max_length", None)
    eos = data.get("eos_token_id")
    extra = [eos] if isinstance(eos, int) else list(eos or [])
    if extra:
        defaults["stop_token_ids"] = tuple(int(t) for t in extra)
    return defaults


def _ort_session_for(path: Path, manifest: dict, providers, threads, model_file: str = io.MODEL_FILE):
    from neoxrt.runtime.ort_session import OrtSession

    model = path / model_file
    if not model.is_file():
        raise ArtifactError(f"artifact {path}: {model_file} is missing")
    if manifest.get("plugin"):
        raise ArtifactError(f"artifact {path}: plugin graphs run on TensorRT; export with --attention decomposed or fused "
                            "for ONNX Runtime")
    return OrtSession(model, providers=providers, threads=threads, config=manifest.get(ORT_SESSION_CONFIG))


def _check_io(session: Session, manifest: dict, path: Path) -> None:
    inputs, outputs = session.io_spec()
    want_in = [t["name"] for t in manifest["io"]["inputs"]]
    want_out = [t["name"] for t in manifest["io"]["outputs"]]
    got_in, got_out = [s.name for s in inputs], [s.name for s in outputs]
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        raise ArtifactError(f"artifact {path}: the model's inputs/outputs do not match its manifest's io "
                            f"(expected {len(want_in)} inputs / {len(want_out)} outputs, found {len(got_in)} / {len(got_out)})")
