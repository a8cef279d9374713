"""The one session interface every backend implements, and the cache-carrying decoder the generation loop
drives. Backends: ONNX Runtime (`neoxrt.runtime.ort_session`), TensorRT (`neoxrt.runtime.trt_session`).

    Session.io_spec() -> (inputs, outputs)        contract TensorSpecs
    Session.run(feeds) -> {name: array}           one forward pass, numpy in and out
    Session.decoder(batch, max_total) -> Decoder  keeps the KV cache between steps (backend-specific)
    Decoder.step(input_ids, attention_mask, position_ids) -> last-position logits [B, V] (fp32)
    Decoder.step_all(...) -> every position's logits [B, S, V]   (speculative decoding's verify step)
    Decoder.truncate(length)                      keep the first `length` cached positions (its rollback)
    Decoder.keep_rows(rows)                       drop finished rows so they stop costing work
    Session.verify_tokens (optional)              the most guessed tokens one step may verify (TensorRT: the
                                                  engine's --verify-tokens; absent: any)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from neoxrt import contract as io
from neoxrt.contract import TensorSpec


class Decoder(Protocol):
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...

    def step_all(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...

    def truncate(self, length: int) -> None: ...

    def keep_rows(self, rows: np.ndarray) -> None: ...


class Session(Protocol):
    num_layers: int

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decoder(self, batch: int, max_total: int) -> Decoder: ...


class FeedDecoder:
    """Portable decoder over `Session.run`: the cache goes out and comes back as arrays each step.
    Backends with device buffers (ORT I/O binding, TensorRT) provide their own."""

    def __init__(self, session: Session, batch: int):
        inputs, _ = session.io_spec()
        spec = {s.name: s for s in inputs}[io.past_key(0)]
        _, heads, _, head_dim = spec.shape
        empty = np.zeros((batch, heads, 0, head_dim), dtype=spec.dtype)
        self.session = session
        self.past = [(empty, empty) for _ in range(session.num_layers)]

    def step(self, input_ids, attention_mask, position_ids):
        return self.step_all(input_ids, attention_mask, position_ids)[:, -1]

    def step_all(self, input_ids, attention_mask, position_ids):
        feeds = {io.INPUT_IDS: input_ids, io.ATTENTION_MASK: attention_mask, io.POSITION_IDS: position_ids}
        for i, (k, v) in enumerate(self.past):
            feeds[io.past_key(i)], feeds[io.past_value(i)] = k, v
        out = self.session.run(feeds)
        self.past = [(out[io.present_key(i)], out[io.present_value(i)]) for i in range(len(self.past))]
        return np.asarray(out[io.LOGITS], dtype=np.float32)

    def truncate(self, length: int) -> None:
        self.past = [(k[:, :, :length], v[:, :, :length]) for k, v in self.past]

    def keep_rows(self, rows):
        self.past = [(k[rows], v[rows]) for k, v in self.past]
