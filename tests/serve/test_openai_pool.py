"""The OpenAI endpoint in front of a scheduler on the KV-cache pool (a static-cache export), in this process on
127.0.0.1 (no Triton): a chunked long prompt and a reused prefix give `Generator`'s tokens, a full queue is 429
with Retry-After, a request past the pool is 400 naming both numbers, a non-streaming client that disconnects
frees its row at once, /health reports a dead scheduler loop, and /metrics carries vLLM's names."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from serve_testing import free_ports

from neoxrt.runtime import Generator
from neoxrt.runtime.kv_pool import token_bytes
from neoxrt.runtime.scheduler import Scheduler

pytest.importorskip("uvicorn", reason="needs the [serve] extra")

LONG = ("Gentlemen of the Senate and House of Representatives: it is my duty to report on the state of the Union, "
        "and I do so with great confidence in our future")


@pytest.fixture(scope="module")
def generator(static_artifact):
    return Generator.from_artifacts(static_artifact, threads=2)


class Front:
    def __init__(self, generator, artifact, started: bool = True, **scheduler):
        from neoxrt.serve.openai_app import OpenAIFrontend

        self.scheduler = Scheduler(generator, **scheduler)
        if started:
            self.scheduler.start()
        (port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self.app = OpenAIFrontend(self.scheduler, generator, "neoxrt", artifact, "127.0.0.1", port)
        self.app.start()

    def post(self, body: dict, timeout: float = 60):
        req = urllib.request.Request(f"{self.url}/v1/completions", json.dumps({"model": "neoxrt", **body}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self):
        self.app.stop()
        self.scheduler.stop()


@pytest.fixture()
def front(generator, static_artifact):
    f = Front(generator, static_artifact, max_batch=4, prefill_tokens=8, prefix_block=4)
    yield f
    f.close()


def test_chunked_and_reused_prompts_give_the_generators_tokens(front, generator):
    ids = generator.encode([LONG])[0]
    want = generator.generate([ids], max_new_tokens=12, ignore_eos=True).ids[0]
    for _ in range(2):  # the second time its blocks come from the prefix cache
        status, body, _ = front.post({"prompt": ids, "max_tokens": 12, "ignore_eos": True, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 12, body
        assert body["choices"][0]["text"] == generator.tokenizer.decode(want)
    assert front.scheduler.stats.prefix_hits >= (len(ids) - 1) // 4 * 4
    text = front.get("/metrics")[1]
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["vllm:generation_tokens_total"] == 24
    assert samples["vllm:prefix_cache_hits_total"] == front.scheduler.stats.prefix_hits > 0
    assert samples["vllm:prompt_tokens_total"] == 2 * len(ids)
    assert samples["vllm:time_to_first_token_seconds_count"] == 2
    assert samples["vllm:inter_token_latency_seconds_count"] == 22
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="neoxrt",le="+Inf"} 2' in text


def test_full_queue_is_429_with_retry_after(generator, static_artifact):
    f = Front(generator, static_artifact, started=False, max_batch=1, max_queue=1)
    try:
        first: dict = {}
        waiting = threading.Thread(target=lambda: first.update(r=f.post({"prompt": "We", "max_tokens": 2})))
        waiting.start()
        deadline = time.monotonic() + 10
        while not f.scheduler.stats.queued and time.monotonic() < deadline:
            time.sleep(0.02)
        status, body, headers = f.post({"prompt": "We", "max_tokens": 2})
        assert status == 429 and headers.get("Retry-After") == "1" and body["error"]["code"] == "server_busy"
        f.scheduler.start()
        waiting.join(30)
        assert first["r"][0] == 200
    finally:
        f.close()


def test_request_past_the_pool_is_400_naming_both_numbers(generator, static_artifact):
    f = Front(generator, static_artifact, prefix_cache=False, kv_cache_memory=token_bytes(generator.session) * 64)
    try:
        status, body, _ = f.post({"prompt": "We", "max_tokens": 100})
        assert status == 400 and body["error"]["param"] == "max_tokens"
        assert "prompt (1 tokens) + max_new_tokens (100) exceeds the KV-cache pool's 64 tokens" in body["error"]["message"]
        status, body, _ = f.post({"prompt": "We", "max_tokens": 5000})
        assert status == 400 and "maximum context length is 2048 tokens; the prompt has 1" in body["error"]["message"]
    finally:
        f.close()


def test_disconnected_client_frees_its_row(front):
    port = int(front.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "neoxrt", "prompt": "We", "max_tokens": 1500, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 20
        while not front.scheduler.stats.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert front.scheduler.stats.active == 1
    gone = time.monotonic()
    while front.scheduler.stats.active and time.monotonic() < gone + 10:
        time.sleep(0.02)
    assert front.scheduler.stats.active == 0 and front.scheduler.stats.cancelled == 1
    assert time.monotonic() - gone < 2.0 and front.scheduler.stats.tokens < 1500


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop dies on purpose
def test_health_reports_a_dead_scheduler_loop(front, monkeypatch):
    assert front.get("/health")[0] == 200

    def die():
        raise SystemExit("killed")

    monkeypatch.setattr(front.scheduler, "step", die)
    status, body, _ = front.post({"prompt": "We", "max_tokens": 2})
    assert status == 500 and "scheduler stopped" in body["error"]["message"]
    front.scheduler._thread.join(10)
    status, text = front.get("/health")
    assert status == 503 and "the scheduler thread has stopped: SystemExit: killed" in text
    status, body, _ = front.post({"prompt": "We", "max_tokens": 2})
    assert status == 503 and body["error"]["code"] == "scheduler_down"
