"""Triton requests to the runtime's `Scheduler` and back: one response per piece for `"stream": true`, one
final response otherwise, an error response naming the problem for a bad request (the server stays up),
and neoxrt's metrics beside Triton's own on /metrics. Runs inside the Python backend's stub process."""

from __future__ import annotations

import threading
import time

import numpy as np

from neoxrt.errors import NeoxrtError
from neoxrt.runtime import Generator
from neoxrt.runtime.scheduler import Scheduler, SchedulerStats
from neoxrt.serve.request import parse_request


class TritonBackend:
    """`pb` is the `triton_python_backend_utils` module (only importable inside Triton)."""

    def __init__(self, pb, name: str, artifact, max_batch: int, max_queue: int, threads: int | None,
                 openai: tuple[str, int] = ("127.0.0.1", 0), kv_cache_memory: float = 0.0,
                 max_prefill_tokens: int = 256, prefix_cache: bool = True):
        """`openai` (host, port): also serve the OpenAI-compatible endpoint on the same scheduler (port 0: off);
        `kv_cache_memory` GiB of KV-cache pool (0: the default)."""
        self.pb = pb
        self.generator = Generator.from_artifacts(artifact, threads=threads)
        self.metrics = _Metrics(pb, name, max_batch)
        self.scheduler = Scheduler(self.generator, max_batch=max_batch, max_queue=max_queue, on_step=self.metrics.update,
                                   prefill_tokens=max_prefill_tokens, prefix_cache=prefix_cache,
                                   kv_cache_memory=int(kv_cache_memory * 2**30) or None)
        self.scheduler.start()
        self.frontend = None
        if openai[1]:
            from neoxrt.serve.openai_app import OpenAIFrontend

            self.frontend = OpenAIFrontend(self.scheduler, self.generator, name, artifact, *openai)
            try:
                self.frontend.start()
            except Exception:
                self.scheduler.stop()
                raise

    def submit(self, request) -> None:
        sender = request.get_response_sender()
        try:
            parsed = parse_request(lambda n: _input(self.pb, request, n))
            reply = _Reply(self, sender, parsed.stream, parsed.options.get("stop_strings", ()))
            self.scheduler.submit(parsed.prompt, reply.on_event, on_error=reply.on_error,
                                  is_cancelled=sender.is_cancelled, **parsed.options)
        except Exception as exc:  # noqa: BLE001 -- any bad request is answered with an error, the model stays up
            self._error(sender, exc)
        self.metrics.update(self.scheduler.stats)

    def _error(self, sender, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, NeoxrtError) else f"{type(exc).__name__}: {exc}"
        response = self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))
        sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def stop(self) -> None:
        if self.frontend is not None:
            self.frontend.stop()
        self.scheduler.stop()


class _Reply:
    """Collects one request's tokens and sends its responses (from the scheduler's thread)."""

    def __init__(self, backend: TritonBackend, sender, stream: bool, stop_strings):
        self.backend, self.sender, self.stream, self.stop_strings = backend, sender, stream, tuple(stop_strings)
        self.ids: list[int] = []

    def on_event(self, event) -> None:
        self.ids.append(event.token_id)
        final = event.finish_reason is not None
        if self.stream:
            self._send(event.text, [event.token_id], event.finish_reason or "", final)
        elif final:
            text = ""
            if self.backend.generator.tokenizer is not None:
                text = Generator._truncate(self.backend.generator.tokenizer.decode(self.ids), self.stop_strings)
            self._send(text, self.ids, event.finish_reason, True)

    def on_error(self, exc: Exception) -> None:
        self.backend._error(self.sender, exc)

    def _send(self, text: str, ids: list[int], reason: str, final: bool) -> None:
        pb = self.backend.pb
        outputs = [pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                   pb.Tensor("output_ids", np.array(ids, np.int64)),
                   pb.Tensor("finish_reason", np.array([reason.encode()], dtype=np.object_))]
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(pb.InferenceResponse(output_tensors=outputs), flags=flags)


def _input(pb, request, name: str):
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class _Metrics:
    """neoxrt_* families on Triton's /metrics: tokens and requests (counters; tokens/s is their rate),
    live rows, queue length and batch occupancy (gauges)."""

    def __init__(self, pb, name: str, max_batch: int):
        self.max_batch, self.last, self.lock, self.pushed = max_batch, {}, threading.Lock(), 0.0
        fam = pb.MetricFamily
        counters = (("tokens", "tokens generated"), ("requests", "requests accepted"),
                    ("rejected", "requests refused because the queue was full"),
                    ("cancelled", "requests cancelled by their client"), ("steps", "decode steps"),
                    ("row_steps", "rows decoded, summed over decode steps (occupancy = d row_steps / d steps / max)"),
                    ("failed", "requests ended by an error of their own"),
                    ("prefill_tokens", "prompt tokens computed"),
                    ("prefix_hits", "prompt tokens copied from the prefix cache instead of computed"),
                    ("prefix_queries", "prompt tokens looked up in the prefix cache"),
                    ("shared_prefix_rows", "rows that attended the KV-cache pool's shared prefix instead of a copy"))
        gauges = (("active_rows", "rows in the running batch"), ("queue_length", "requests waiting for a row"),
                  ("batch_occupancy", "mean live rows per decode step / max batch"),
                  ("kv_cache_usage", "KV-cache pool slots in use / its capacity (0 without the pool)"))
        # families must outlive their metrics: both are kept
        self.families = [fam(name=f"neoxrt_{key}_total", description=text, kind=fam.COUNTER) for key, text in counters]
        self.families += [fam(name=f"neoxrt_{key}", description=text, kind=fam.GAUGE) for key, text in gauges]
        metrics = [family.Metric(labels={"model": name}) for family in self.families]
        self.counters = dict(zip([k for k, _ in counters], metrics))
        self.gauges = dict(zip([k for k, _ in gauges], metrics[len(counters):]))

    def update(self, s: SchedulerStats, every_s: float = 0.25) -> None:
        """Push the counters and gauges, at most every `every_s` seconds while busy, always when idle."""
        now = time.monotonic()
        with self.lock:  # called from Triton's thread (submit) and the scheduler's (each step)
            if now - self.pushed < every_s and (s.active or s.queued):
                return
            self.pushed = now
            for key, metric in self.counters.items():
                value = getattr(s, key)
                metric.increment(value - self.last.get(key, 0))
                self.last[key] = value
            self.gauges["active_rows"].set(s.active)
            self.gauges["queue_length"].set(s.queued)
            self.gauges["batch_occupancy"].set(s.row_steps / s.steps / self.max_batch if s.steps else 0.0)
            self.gauges["kv_cache_usage"].set(s.pool_tokens / s.pool_capacity if s.pool_capacity else 0.0)

