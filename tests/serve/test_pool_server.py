"""`neoxrt serve` of a static-cache export (the KV-cache pool) through a real tritonserver on 127.0.0.1: a prompt
chunked 4 tokens a step, concurrent requests and a re-sent prompt (prefix reuse) give `Generator`'s tokens, through
Triton and the OpenAI endpoint of the same scheduler, whose /metrics shows the pool."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_testing import start_server, stop_server

from neoxrt.runtime import Generator

PROMPTS = ["Gentlemen of the Senate and House of Representatives: it is my duty to report", "We", "Our economy is",
           "Tonight I can report to the nation", "The state of the Union is strong", "In"]


@pytest.fixture(scope="module")
def served(static_artifact, tmp_path_factory):
    srv = start_server(static_artifact, tmp_path_factory.mktemp("pool-tmp"), openai=True,
                       extra=("--max-prefill-tokens", "4", "--kv-cache-memory", "0.05"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def generator(static_artifact):
    return Generator.from_artifacts(static_artifact, threads=2)


def completion(served, prompt: str) -> dict:
    body = {"model": "neoxrt", "prompt": prompt, "max_tokens": 10, "ignore_eos": True}
    req = urllib.request.Request(f"{served.openai}/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_pool_serves_concurrent_chunked_requests_with_their_alone_tokens(served, generator):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: served.generate(text_input=p, max_tokens=10, ignore_eos=True), PROMPTS))
    for prompt, (status, body) in zip(PROMPTS, answers):
        assert status == 200, body
        assert body["output_ids"] == generator.generate([prompt], max_new_tokens=10, ignore_eos=True).ids[0], prompt


def test_re_sent_prompt_reuses_its_prefix_through_openai(served, generator):
    prompt = " ".join(PROMPTS) * 3  # past two of the prefix cache's 32-token blocks
    assert len(generator.encode(prompt)[0]) > 64
    want = generator.generate([prompt], max_new_tokens=10, ignore_eos=True).text[0]
    assert [completion(served, prompt)["choices"][0]["text"] for _ in range(2)] == [want, want]
    with urllib.request.urlopen(f"{served.openai.removesuffix('/v1')}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["vllm:prefix_cache_hits_total"] >= 64 and samples["vllm:num_requests_waiting"] == 0
    assert samples["vllm:generation_tokens_total"] >= 10 * (len(PROMPTS) + 2)
    assert samples["vllm:time_to_first_token_seconds_count"] >= len(PROMPTS) + 2
    deadline = time.monotonic() + 10  # Triton's port (neoxrt_*) is pushed after the step that ends the request
    while True:
        with urllib.request.urlopen(f"{served.metrics}/metrics", timeout=10) as r:
            triton = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                      if line.startswith("neoxrt_")}
        if triton["neoxrt_prefix_hits_total"] == samples["vllm:prefix_cache_hits_total"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert triton["neoxrt_prefix_hits_total"] == samples["vllm:prefix_cache_hits_total"]
    assert triton["neoxrt_prefill_tokens_total"] > 0 and triton["neoxrt_failed_total"] == 0
    assert 0 <= triton["neoxrt_kv_cache_usage"] <= 1
