"""`Classifier`: runs the head artifacts (`neoxrt export --task ...`) without torch -- sequence classification
(`classify`), token classification (`tag`) and extractive question answering (`answer`).

    texts -> tokenizer.json -> rows of ids -> sorted by length, batches of `batch_size`, right-padded
          -> session.run({input_ids, attention_mask}) -> per row: logits [L] | logits [S, L] | start, end [S]

On a TensorRT engine (`neoxrt build` of a head artifact: one profile, batch x sequence) the same rows run
through the TensorRT session; batches and rows are kept within the profile's maxima.

Padding never changes a row's result (the graph counts positions over real tokens and pools the last real
token), so rows of any lengths share a batch. Question answering encodes (question, context) as transformers'
`tokenizer(question, context)` does for GPT-NeoX (question ids, then context ids; whatever the tokenizer's
post-processor adds), and splits a context too long for the model into overlapping windows (`stride` context
tokens shared by neighbours), as the question-answering pipeline does; each window is its own row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.engine_meta import PROMPT
from neoxrt.errors import ArtifactError, RuntimeShapeError
from neoxrt.manifest import read_manifest
from neoxrt.runtime.generator import _check_io, _ort_session_for
from neoxrt.runtime.session import Session

MAX_ANSWER_LEN = 15  # tokens; the question-answering pipeline's max_answer_len
DEFAULT_STRIDE = 128  # context tokens shared by neighbouring windows (the pipeline's doc_stride)


@dataclass(frozen=True)
class Classification:
    """One text's class: the best label, its probability, every label's probability, the raw logits.
    Probabilities are a softmax over the labels, or a sigmoid for a single-label head (a reward model or a
    regression head: `logits[0]` is then the raw score), as transformers' classification pipeline does."""

    label: str
    score: float
    scores: dict[str, float]
    logits: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaggedToken:
    """One token's label; `start`/`end` are character offsets into the text, `token` = text[start:end]."""

    token: str
    start: int
    end: int
    label: str
    score: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """The best span of the context: its text, character offsets into the context, and its probability
    (softmax of start logits times softmax of end logits over the context tokens of its window)."""

    answer: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict:
        return asdict(self)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [B, width], real tokens first."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def best_span(start: np.ndarray, end: np.ndarray, max_len: int) -> tuple[int, int, float]:
    """(i, j, probability) maximising start[i] + end[j] over i <= j < i + max_len (logits of one window's
    context tokens); the probability is softmax(start)[i] * softmax(end)[j]."""
    pair = start[:, None] + end[None, :]  # [n, n]
    offset = np.arange(len(start))[None, :] - np.arange(len(start))[:, None]  # j - i
    pair = np.where((offset >= 0) & (offset < max_len), pair, -np.inf)
    i, j = np.unravel_index(int(np.argmax(pair)), pair.shape)
    return int(i), int(j), float(softmax(start)[i] * softmax(end)[j])


class Classifier:
    """Runs a head artifact. Use `Classifier.from_artifacts(path)`."""

    def __init__(self, session: Session, manifest: dict, tokenizer, batch_size: int = 8, name: str = "artifact"):
        if batch_size < 1:
            raise RuntimeShapeError(f"batch_size must be >= 1, got {batch_size}")
        self.session, self.manifest, self.tokenizer, self.batch_size, self.name = session, manifest, tokenizer, batch_size, name
        self.task = manifest.get("task", io.TEXT_GENERATION)
        labels = manifest.get("id2label") or {}
        self.labels = [labels[str(i)] for i in range(len(labels))]
        self.max_positions = int(manifest["config"]["max_position_embeddings"])
        self.vocab_size = int(manifest["config"]["vocab_size"])
        eos = manifest["config"].get("eos_token_id")
        self.pad_id = 0 if eos is None else int(eos)
        if manifest.get("profiles"):  # a TensorRT engine: its profile bounds the rows per batch and their tokens
            profile = manifest["profiles"][PROMPT]
            self.batch_size = min(self.batch_size, int(profile[io.BATCH][2]))
            self.max_positions = min(self.max_positions, int(profile[io.SEQUENCE][2]))

    @classmethod
    def from_artifacts(cls, path, providers=None, threads: int | None = None, batch_size: int = 8,
                       verify: bool = True) -> Classifier:
        """Load a head artifact written by `neoxrt export` or `neoxrt calibrate` (ONNX Runtime) or an engine of
        one written by `neoxrt build` (TensorRT): text-classification, token-classification or question-answering.

        Raises:
            ArtifactError: missing folder or files, manifest mismatch, no tokenizer.json, or not a head artifact.
        """
        path = Path(path)
        manifest = read_manifest(path, ("export", "calibrate", "build"), verify_files=verify)
        task = manifest.get("task", io.TEXT_GENERATION)
        runs = (io.TEXT_CLASSIFICATION, io.TOKEN_CLASSIFICATION, io.QUESTION_ANSWERING)
        if task not in runs:
            raise ArtifactError(f"artifact {path} is a {task} export; Classifier runs {', '.join(runs)} exports "
                                f"(neoxrt export --task ...)")
        if not (path / io.TOKENIZER_FILE).is_file():
            raise ArtifactError(f"artifact {path}: no {io.TOKENIZER_FILE}; the heads take text")
        if manifest["stage"] == "build":
            from neoxrt.runtime.trt_session import TrtSession

            session = TrtSession(path, manifest)
        else:
            session = _ort_session_for(path, manifest, providers, threads)
        _check_io(session, manifest, path)
        from tokenizers import Tokenizer

        return cls(session, manifest, Tokenizer.from_file(str(path / io.TOKENIZER_FILE)), batch_size, str(path))

    # -- shared ------------------------------------------------------------------------------------------
    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            raise ArtifactError(f"{method} needs a {task} artifact; {self.name} is a {self.task} export")

    def _texts(self, texts) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise RuntimeShapeError("no text given")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise RuntimeShapeError(f"text {i + 1} of {len(texts)} is empty: expected at least one token")
        return texts

    def _encode(self, text: str, what: str):
        encoding = self.tokenizer.encode(text)
        if not encoding.ids:
            raise RuntimeShapeError(f"{what} is empty: expected at least one token")
        if len(encoding.ids) > self.max_positions:
            raise RuntimeShapeError(f"{what} has {len(encoding.ids)} tokens; the model holds {self.max_positions}")
        bad = [t for t in encoding.ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RuntimeShapeError(f"{what}: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        return encoding

    def run_rows(self, rows: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """Every row's outputs, unpadded ({name: [L] | [S, L] | [S]}), rows batched by length."""
        results: list[dict[str, np.ndarray]] = [{} for _ in rows]
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin:begin + self.batch_size]
            ids, mask = right_pad([rows[r] for r in chunk], self.pad_id)
            out = self.session.run({io.INPUT_IDS: ids, io.ATTENTION_MASK: mask})
            for i, r in enumerate(chunk):
                n = len(rows[r])
                results[r] = {k: np.asarray(v[i] if v.ndim == 2 and k == io.LOGITS and self.task == io.TEXT_CLASSIFICATION
                                            else v[i, :n], np.float32) for k, v in out.items()}
        return results

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits)) if logits.shape[-1] == 1 else softmax(logits)

    # -- the three tasks ---------------------------------------------------------------------------------
    def classify(self, texts) -> list[Classification]:
        """One `Classification` per text (text-classification artifacts).

        Raises:
            ArtifactError: the artifact is another head.
            RuntimeShapeError: no text, an empty text, or a text longer than the model's positions.
        """
        self._require(io.TEXT_CLASSIFICATION, "classify")
        texts = self._texts(texts)
        rows = [self._encode(t, f"text {i + 1}").ids for i, t in enumerate(texts)]
        results = []
        for out in self.run_rows(rows):
            logits = out[io.LOGITS].astype(np.float64)
            probs = self._probabilities(logits)
            best = int(np.argmax(probs))
            results.append(Classification(self.labels[best], float(probs[best]),
                                          {label: float(p) for label, p in zip(self.labels, probs)},
                                          [float(v) for v in logits]))
        return results

    def tag(self, texts) -> list[list[TaggedToken]]:
        """Per text, every token's label with character offsets (token-classification artifacts).

        Raises:
            ArtifactError: the artifact is another head.
            RuntimeShapeError: no text, an empty text, or a text longer than the model's positions.
        """
        self._require(io.TOKEN_CLASSIFICATION, "tag")
        texts = self._texts(texts)
        encodings = [self._encode(t, f"text {i + 1}") for i, t in enumerate(texts)]
        results = []
        for text, enc, out in zip(texts, encodings, self.run_rows([e.ids for e in encodings])):
            probs = self._probabilities(out[io.LOGITS].astype(np.float64))  # [S, L]
            best = probs.argmax(-1)
            results.append([TaggedToken(text[s:e], int(s), int(e), self.labels[int(k)], float(probs[t, k]))
                            for t, ((s, e), k) in enumerate(zip(enc.offsets, best))])
        return results

    def answer(self, question: str, context: str, max_answer_len: int = MAX_ANSWER_LEN, stride: int | None = None,
               max_length: int | None = None) -> Answer:
        """The best answer span of `context` (question-answering artifacts).

        Args:
            max_answer_len: longest answer in tokens.
            stride: context tokens shared by neighbouring windows (default min(128, half a window)).
            max_length: tokens per window (default: the model's positions).

        Raises:
            ArtifactError: the artifact is another head.
            RuntimeShapeError: an empty question or context, a question leaving no room for the context, or a
                bad max_answer_len / stride / max_length.
        """
        self._require(io.QUESTION_ANSWERING, "answer")
        if not isinstance(question, str) or not question.strip():
            raise RuntimeShapeError("empty question: expected at least one token")
        if not isinstance(context, str) or not context.strip():
            raise RuntimeShapeError("empty context: expected at least one token")
        if max_answer_len < 1:
            raise RuntimeShapeError(f"max_answer_len must be >= 1, got {max_answer_len}")
        max_length = max_length or self.max_positions
        if not 2 <= max_length <= self.max_positions:
            raise RuntimeShapeError(f"max_length must be in [2, {self.max_positions}], got {max_length}")
        pair = self.tokenizer.encode(question, context)
        seq = pair.sequence_ids
        ctx = [t for t, s in enumerate(seq) if s == 1]
        prefix, suffix = pair.ids[: ctx[0]], pair.ids[ctx[-1] + 1:]
        room = max_length - len(prefix) - len(suffix)
        if room < 1:
            raise RuntimeShapeError(f"the question takes {len(prefix) + len(suffix)} tokens of a {max_length}-token "
                                    "window; no room is left for the context")
        stride = min(DEFAULT_STRIDE, room // 2) if stride is None else stride
        if not 0 <= stride < room:
            raise RuntimeShapeError(f"stride must be in [0, {room}) for a {room}-token context window, got {stride}")
        windows = [ctx[b:b + room] for b in range(0, max(1, len(ctx) - stride), room - stride)]
        windows = [w for i, w in enumerate(windows) if i == 0 or w[-1] > windows[i - 1][-1]]
        rows = [prefix + [pair.ids[t] for t in w] + suffix for w in windows]
        best = None
        for window, out in zip(windows, self.run_rows(rows)):
            span = slice(len(prefix), len(prefix) + len(window))
            i, j, score = best_span(out[io.START_LOGITS][span].astype(np.float64),
                                    out[io.END_LOGITS][span].astype(np.float64), max_answer_len)
            if best is None or score > best.score:
                start, end = pair.offsets[window[i]][0], pair.offsets[window[j]][1]
                best = Answer(context[start:end], int(start), int(end), score)
        return best
