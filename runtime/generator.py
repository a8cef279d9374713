"""`Generator`: text generation over any `Session` -- the loop is written once: prompt step, then decode
steps, each row stopping on its own (EOS, stop ids, stop strings, max tokens)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import ArtifactError, RuntimeShapeError
from neoxrt.manifest import ORT_SESSION_CONFIG, read_manifest
from neoxrt.runtime.sampling import GenerationOptions, next_tokens
from neoxrt.runtime.session import Session

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass
class TokenEvent:
    """One streamed token: which row, its id, and the text it completes (may be '' mid-character)."""

    row: int
    token_id: int
    text: str
    finish_reason: str | None  # None while the row goes on; else length, stop_token or stop_string


@dataclass
class GenerationResult:
    ids: list[list[int]]  # new tokens per row (prompt excluded)
    text: list[str] | None  # decoded new text per row, None without a tokenizer
    finish_reasons: list[str]


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids) int64 [B, width] for a left-padded batch; positions count
    real tokens only, as transformers makes them (padding positions are 1, never attended)."""
    width = max(len(r) for r in rows)
    ids = np.array([[pad_id] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    pos = np.where(mask == 1, mask.cumsum(-1) - 1, 1).astype(np.int64)
    return ids, mask, pos


class Generator:
    """Runs a neoxrt artifact. Use `Generator.from_artifacts(path)`."""

    def __init__(self, session: Session, manifest: dict, tokenizer=None):
        self.session = session
        self.manifest = manifest
        config = self.config = manifest["config"]
        self.tokenizer = tokenizer
        self.eos_token_id = config.get("eos_token_id")
        self.max_positions = int(config["max_position_embeddings"])

    @classmethod
    def from_artifacts(cls, path, backend: str = "auto", providers=None, threads: int | None = None,
                       verify: bool = True) -> Generator:
        """Load an artifact folder written by `neoxrt export` (or calibrate / build).

        Raises:
            ArtifactError: missing folder or files, manifest mismatch (files, toolkit version, I/O).
        """
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
        return cls(session, manifest, tokenizer)

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
            else:
                ids = [int(t) for t in prompt]
            if not ids:
                raise RuntimeShapeError("empty prompt: expected at least one token")
            bad = [t for t in ids if not 0 <= t < int(self.config["vocab_size"])]
            if bad:
                raise RuntimeShapeError(f"token id {bad[0]} outside the vocabulary [0, {self.config['vocab_size']})")
            rows.append(ids)
        return rows

    # -- generation -----------------------------------------------------------------------------------
    def stream(self, prompts, **kwargs) -> Iterator[TokenEvent]:
        """Yield tokens as they are produced (all rows interleaved). Keywords: `GenerationOptions`."""
        options = GenerationOptions(**kwargs)
        rows = self.encode(prompts)
        longest = max(len(r) for r in rows)
        if longest + options.max_new_tokens > self.max_positions:
            raise RuntimeShapeError(
                f"prompt ({longest} tokens) + max_new_tokens ({options.max_new_tokens}) exceeds the model's "
                f"context of {self.max_positions} positions"
            )
        yield from self._loop(rows, options)

    def generate(self, prompts, **kwargs) -> GenerationResult:
        """Generate for one prompt or a batch; returns new ids (and text when there is a tokenizer)."""
        rows = self.encode(prompts)
        ids: list[list[int]] = [[] for _ in rows]
        reasons = ["length"] * len(rows)
        for event in self.stream(rows, **kwargs):
            ids[event.row].append(event.token_id)
            if event.finish_reason:
                reasons[event.row] = event.finish_reason
        stop_strings = tuple(kwargs.get("stop_strings", ()))
        text = None
        if self.tokenizer is not None:
            text = [self._truncate(self.tokenizer.decode(r), stop_strings) for r in ids]
        return GenerationResult(ids, text, reasons)

    @staticmethod
    def _truncate(text: str, stop_strings: tuple[str, ...]) -> str:
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def _loop(self, rows: list[list[int]], options: GenerationOptions) -> Iterator[TokenEvent]:
        batch, width = len(rows), max(len(r) for r in rows)
        ids, mask, pos = left_pad(rows, 0 if self.eos_token_id is None else self.eos_token_id)
        decoder = self.session.decoder(batch, width + options.max_new_tokens)
        rng = np.random.default_rng(options.seed)
        stops = set(options.stop_token_ids)
        if self.eos_token_id is not None and not options.ignore_eos:
            stops.add(self.eos_token_id)
        seen = [np.array(r, np.int64) for r in rows]
        generated: list[list[int]] = [[] for _ in rows]
        emitted = [""] * batch
        live = np.arange(batch)  # original row index of each decoder row
        logits = decoder.step(ids, mask, pos)
        for _ in range(options.max_new_tokens):
            chosen = next_tokens(logits, [seen[r] for r in live], options, rng)
            finished = np.zeros(len(live), bool)
            for j, row in enumerate(live):
                token = int(chosen[j])
                generated[row].append(token)
                seen[row] = np.append(seen[row], token)
                piece, reason = self._piece(row, generated[row], emitted, options)
                if token in stops:
                    reason = "stop_token"
                elif len(generated[row]) >= options.max_new_tokens:
                    reason = reason or "length"
                finished[j] = reason is not None
                yield TokenEvent(int(row), token, piece, reason)
            if finished.all():
                return
            keep = np.flatnonzero(~finished)
            nxt = chosen[keep][:, None].astype(np.int64)
            if len(keep) < len(live):
                decoder.keep_rows(keep)
                mask, pos, live = mask[keep], pos[keep], live[keep]
            mask = np.concatenate([mask, np.ones((len(live), 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            logits = decoder.step(nxt, mask, pos)

    def _piece(self, row, tokens, emitted, options) -> tuple[str, str | None]:
        """The new text of `row` (held back while a character is incomplete) and 'stop_string' if one
        appeared."""
        if self.tokenizer is None:
            return "", None
        text = self.tokenizer.decode(tokens)
        if options.stop_strings and any(s in text for s in options.stop_strings):
            return "", "stop_string"
        if text.endswith("\ufffd"):
            return "", None
        piece = text[len(emitted[row]):] if text.startswith(emitted[row]) else text
        emitted[row] = text
        return piece, None


def _ort_session_for(path: Path, manifest: dict, providers, threads):
    from neoxrt.runtime.ort_session import OrtSession

    model = path / io.MODEL_FILE
    if not model.is_file():
        raise ArtifactError(f"artifact {path}: {io.MODEL_FILE} is missing")
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
        raise ArtifactError(f"artifact {path}: the model's inputs/outputs do not match its manifest "
                            f"(expected {len(want_in)} inputs / {len(want_out)} outputs, found {len(got_in)} / {len(got_out)})")
