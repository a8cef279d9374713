"""`neoxrt serve` through a real tritonserver on 127.0.0.1: unary, SSE and gRPC streaming, concurrency equal to
one-at-a-time, bad requests refused by name while the server stays ready, a short request joining a long one,
metrics, and SIGTERM leaving nothing behind. The last test stops the server."""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serve_testing import children

from neoxrt.runtime import Generator

PROMPT = "The state of the Union is"


@pytest.fixture(scope="module")
def generator(artifact):
    return Generator.from_artifacts(artifact, threads=2)


def test_unary_generate_equals_neoxrt_generate(server, generator):
    status, body = server.generate(text_input=PROMPT, max_tokens=16)
    assert status == 200, body
    alone = generator.generate([PROMPT], max_new_tokens=16)
    assert body["output_ids"] == alone.ids[0]
    assert body["text_output"] == alone.text[0] and body["finish_reason"] == alone.finish_reasons[0]


def sse(server, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{server.http}/v2/models/{server.name}/generate_stream", json.dumps(body).encode())
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    return events


def test_sse_stream_sends_one_event_per_token(server, generator):
    events = sse(server, {"text_input": PROMPT, "max_tokens": 12, "stream": True})
    alone = generator.generate([PROMPT], max_new_tokens=12)
    assert [e["output_ids"] for e in events] == alone.ids[0]
    assert "".join(e["text_output"] for e in events) == alone.text[0]
    assert [e["finish_reason"] for e in events] == [""] * 11 + ["length"]


def test_grpc_stream_through_tritonclient(server, generator):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("max_tokens", [1], "INT32"),
                  grpcclient.InferInput("stream", [1], "BOOL")]
        inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([10], np.int32))
        inputs[2].set_data_from_numpy(np.array([True]))
        client.async_stream_infer(server.name, inputs, request_id="g1")
        ids, text = [], ""
        for _ in range(10):
            result, error = results.get(timeout=60)
            assert error is None, error
            ids += result.as_numpy("output_ids").tolist()
            text += result.as_numpy("text_output")[0].decode()
            if result.as_numpy("finish_reason")[0]:
                break
    finally:
        client.stop_stream()
        client.close()
    alone = generator.generate([PROMPT], max_new_tokens=10)
    assert ids == alone.ids[0] and text == alone.text[0]


CONCURRENT = [(p, dict(max_tokens=8 + 3 * i, **({"temperature": 0.9, "top_k": 40, "seed": i} if i % 3 == 0 else {})))
              for i, p in enumerate(["We", "Our economy", "Tonight", "The Congress", "Let us", "America is", "In this",
                                     "Freedom", "My fellow", "Today", "Our nation", "The people", "Jobs", "We must",
                                     "Taxes", "Peace"])]


def test_sixteen_concurrent_requests_equal_their_one_at_a_time_outputs(server, generator):
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda c: server.generate(text_input=c[0], **c[1]), CONCURRENT))
    for (prompt, body), (status, reply) in zip(CONCURRENT, replies):
        assert status == 200, reply
        options = {"max_new_tokens": body["max_tokens"], **{k: v for k, v in body.items() if k != "max_tokens"}}
        assert reply["output_ids"] == generator.generate([prompt], **options).ids[0], prompt


@pytest.mark.parametrize("body, message", [
    ({"text_input": "We", "max_tokens": -1}, "max_tokens must be an integer >= 1, got -1"),
    ({"max_tokens": 4}, "text_input is required"),
    ({"text_input": "We", "top_p": 5}, "top_p must be in (0, 1], got 5"),
    ({"text_input": "We", "max_tokens": 5000}, "max_new_tokens (5000) exceeds the model's context of 2048"),
    ({"text_input": "word " * 2100, "max_tokens": 4}, "exceeds the model's context of 2048"),
    ({"text_input": "We", "temperature": -1}, "temperature must be a number >= 0"),
    ({"text_input": "We", "seed": -1}, "seed must be an integer in [0, 9223372036854775808), got -1"),
])
def test_bad_requests_are_refused_by_name_and_the_server_stays_ready(server, body, message):
    status, reply = server.generate(**body)
    assert status == 400 and message in reply["error"], reply
    assert server.ready()
    assert server.generate(text_input="We", max_tokens=2)[0] == 200


def test_short_request_joins_a_long_one_in_flight(server, generator):
    order, first_token = [], threading.Event()

    def long_stream():
        req = urllib.request.Request(f"{server.http}/v2/models/{server.name}/generate_stream", json.dumps(
            {"text_input": PROMPT, "max_tokens": 300, "stream": True, "ignore_eos": True}).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    first_token.set()
                    if json.loads(line[6:])["finish_reason"]:
                        order.append("long")

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert first_token.wait(60)
    status, reply = server.generate(text_input="We", max_tokens=4, ignore_eos=True)
    order.append("short")
    thread.join(120)
    assert status == 200 and order == ["short", "long"]
    assert reply["output_ids"] == generator.generate(["We"], max_new_tokens=4, ignore_eos=True).ids[0]


def test_metrics_count_tokens_and_occupancy(server):
    with urllib.request.urlopen(f"{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("neoxrt_")}
    assert values["neoxrt_tokens_total"] > 100 and values["neoxrt_requests_total"] >= 20
    assert 0 < values["neoxrt_batch_occupancy"] <= 1 and values["neoxrt_queue_length"] == 0
    assert "nv_inference_request_success" in text  # Triton's own


def test_grpc_stream_cancelled_by_the_client_leaves_the_batch(server):
    grpcclient = pytest.importorskip("tritonclient.grpc")

    def cancelled() -> float:
        with urllib.request.urlopen(f"{server.metrics}/metrics", timeout=10) as r:
            return next(float(x.rsplit(" ", 1)[1]) for x in r.read().decode().splitlines()
                        if x.startswith("neoxrt_cancelled_total"))

    before, got = cancelled(), queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: got.put(error))
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("max_tokens", [1], "INT32"),
              grpcclient.InferInput("stream", [1], "BOOL"), grpcclient.InferInput("ignore_eos", [1], "BOOL")]
    inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([1000], np.int32))
    inputs[2].set_data_from_numpy(np.array([True]))
    inputs[3].set_data_from_numpy(np.array([True]))
    client.async_stream_infer(server.name, inputs, request_id="c1")
    assert got.get(timeout=60) is None  # it is decoding
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 30
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled() == before + 1
    assert server.generate(text_input="We", max_tokens=2)[0] == 200


def test_sigterm_stops_everything_within_ten_seconds(server):
    pids = children(server.proc.pid)
    assert pids, "tritonserver is a child of neoxrt serve"
    regions = [p for p in Path("/dev/shm").glob(f"neoxrt_{server.proc.pid}_*")]
    assert regions, "the Python backend's shared memory is named with our prefix"
    assert list(server.tmpdir.glob("neoxrt-serve-*")), "the repository lives in a temporary folder"
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - start < 10
    alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert not alive
    assert not list(Path("/dev/shm").glob(f"neoxrt_{server.proc.pid}_*"))
    assert not list(server.tmpdir.glob("neoxrt-serve-*"))  # (ONNX Runtime leaves its own .ses file in TMPDIR)
