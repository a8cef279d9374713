"""The OpenAI-compatible endpoint of `neoxrt serve --openai-port`, through the real `openai` client (no code of
ours on the client side) against a real server on 127.0.0.1, beside Triton's ports and on the same scheduler:
tokens equal `Generator`'s, logprobs/echo equal `Generator.logprobs`/`prompt_logprobs`, n with a seed
reproducible, bad fields answered 400 naming the field, chat refused without a chat template and served with one."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest
from serve_testing import start_server, stop_server

from neox_testing import default_checkpoint
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator

openai = pytest.importorskip("openai", reason="needs the dev extra (the openai client)")

PROMPT = "The state of the Union is"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def served(artifact, tmp_path_factory):
    srv = start_server(artifact, tmp_path_factory.mktemp("openai-tmp"), openai=True)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.openai, api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def generator(artifact):
    return Generator.from_artifacts(artifact, threads=1)


def post(url: str, raw: str, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, raw.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def counters(served) -> dict[str, float]:
    with urllib.request.urlopen(f"{served.metrics}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {x.split("{")[0]: float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("neoxrt_")}


def test_models_and_greedy_completion_equal_the_generator(client, served, generator):
    assert [m.id for m in client.models.list().data] == ["neoxrt"]
    want = generator.generate([PROMPT], max_new_tokens=12)
    before = counters(served)["neoxrt_requests_total"]
    got = client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    (choice,) = got.choices
    assert choice.text == want.text[0] and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [generator.tokenizer.decode([t]) for t in want.ids[0]]
    assert got.usage.prompt_tokens == 6 and got.usage.completion_tokens == 12 and got.usage.total_tokens == 18
    ids = generator.encode([PROMPT])[0]  # token ids as the prompt, and a list of prompts: the same tokens
    both = client.completions.create(model="neoxrt", prompt=[ids, PROMPT], max_tokens=12, temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and {c.text for c in both.choices} == {want.text[0]}
    # the Triton model's scheduler counted them: one scheduler behind both fronts
    deadline = time.monotonic() + 10
    while counters(served)["neoxrt_requests_total"] < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counters(served)["neoxrt_requests_total"] >= before + 3


def test_streaming_equals_the_generator(client, served, generator):
    want = generator.generate([PROMPT], max_new_tokens=20, stop_strings=(" people",))
    chunks = list(client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stop=" people", stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.ids[0])
    body = json.dumps({"model": "neoxrt", "prompt": PROMPT, "max_tokens": 3, "stream": True})
    with urllib.request.urlopen(urllib.request.Request(f"{served.openai}/completions", body.encode()), timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_logprobs_and_echo_equal_the_generator(client, generator):
    want = generator.generate([PROMPT], max_new_tokens=5, logprobs=3).logprobs[0]
    prompt_want = generator.prompt_logprobs([PROMPT])[0]
    got = client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3, echo=True)
    lp = got.choices[0].logprobs
    assert got.choices[0].text.startswith(PROMPT) and len(lp.tokens) == 6 + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:6] == pytest.approx(prompt_want[1:], abs=1e-4)
    assert lp.token_logprobs[6:] == pytest.approx([t["logprob"] for t in want], abs=1e-4)
    for top, ref in zip(lp.top_logprobs[6:], want):
        assert {generator.tokenizer.decode([t]) for t, _ in ref["top"]} <= set(top)
    assert lp.text_offset[:2] == [0, len("The")]
    # echo alone (what evaluation harnesses send): the prompt scored, nothing generated
    only = client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=0, logprobs=1, echo=True)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(prompt_want[1:], abs=1e-4)
    streamed = list(client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                              echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text
    assert [x for c in streamed for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs


def test_n_with_a_seed_is_reproducible(client, generator):
    def ask():
        got = client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11)
        return [c.text for c in sorted(got.choices, key=lambda c: c.index)]

    first = ask()
    assert ask() == first and len(set(first)) > 1
    # choice k draws with seed + k, the tokens Generator draws for that seed alone
    assert first == [generator.generate([PROMPT], max_new_tokens=8, temperature=1.0, seed=11 + k).text[0] for k in range(3)]


BAD = [  # (raw JSON fields, the field the 400 must name)
    ('"temperature": "hot"', "temperature"), ('"temperature": NaN', "temperature"), ('"temperature": 2.5', "temperature"),
    ('"top_p": Infinity', "top_p"), ('"top_p": 1.5', "top_p"), ('"top_p": 0', "top_p"), ('"n": 0', "n"),
    ('"n": 2, "temperature": 0', "n"), ('"n": 2', "n"), ('"max_tokens": -1', "max_tokens"), ('"max_tokens": 0', "max_tokens"),
    ('"max_tokens": 2.5', "max_tokens"), ('"max_tokens": true', "max_tokens"), ('"max_tokens": 5000', "max_tokens"),
    ('"logprobs": 50', "logprobs"), ('"stop": [""]', "stop"), ('"stop": ["a", "b", "c", "d", "e"]', "stop"),
    ('"stop": 3', "stop"), ('"seed": -1', "seed"), ('"echo": "yes"', "echo"), ('"stream": 1', "stream"),
    ('"stream_options": {"include_usage": true}', "stream_options"), ('"best_of": 3', "best_of"),
    ('"presence_penalty": 1.0', "presence_penalty"), ('"logit_bias": {"5": 100}', "logit_bias"),
    ('"frobnicate": 1', "frobnicate"), ('"repetition_penalty": -1', "repetition_penalty"), ('"top_k": "x"', "top_k"),
    ('"user": 5', "user"),
]


@pytest.mark.parametrize("fields, param", BAD, ids=[b[0].split('"')[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_fields_are_refused_naming_the_field(served, fields, param):
    status, body = post(f"{served.openai}/completions", '{"model": "neoxrt", "prompt": "We", ' + fields + "}")
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    assert param.split(".")[0] in body["error"]["message"] or "Unrecognized" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_bad_prompts_models_and_bodies(client, served):
    for prompt in ([], [[1, "a"]], [""], [50_000_000], None):
        status, body = post(f"{served.openai}/completions", json.dumps({"model": "neoxrt", "prompt": prompt}))
        assert status == 400 and body["error"]["param"] == "prompt", (prompt, body)
    status, body = post(f"{served.openai}/completions", json.dumps({"model": "gpt-4", "prompt": "We"}))
    assert status == 404 and body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"
    for raw in ("{not json", '{"model": "neoxrt", "prompt": "We", "x": ' + "[" * 5000 + "]" * 5000 + "}",
                '{"model": "neoxrt", "prompt": "\\ud800", "max_tokens": 2}', '{"model": "neoxrt", "stop": ["\\udfff"]}'):
        status, body = post(f"{served.openai}/completions", raw)  # bad JSON, nested past the parser, lone surrogates
        assert status == 400 and ("JSON" in body["error"]["message"] or "surrogate" in body["error"]["message"]), raw
    many = {"model": "neoxrt", "prompt": ["We"] * 5, "n": 16, "temperature": 1.0, "max_tokens": 2}  # 80 rows > 64
    status, body = post(f"{served.openai}/completions", json.dumps(many))  # never queueable: 400, not 429 for ever
    assert status == 400 and body["error"]["param"] == "n" and "--max-queue" in body["error"]["message"], body
    with pytest.raises(openai.BadRequestError) as err:  # the client sees OpenAI's error shape
        client.completions.create(model="neoxrt", prompt="We", top_p=3.0)
    assert err.value.status_code == 400 and err.value.body["param"] == "top_p"
    assert client.completions.create(model="neoxrt", prompt="We", max_tokens=2).choices  # still serving


def test_chat_is_refused_without_a_chat_template(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="neoxrt", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in err.value.message and err.value.body["param"] == "messages"


def test_a_closed_stream_cancels_its_row(served):
    before = counters(served)["neoxrt_cancelled_total"]
    body = json.dumps({"model": "neoxrt", "prompt": PROMPT, "max_tokens": 1500, "stream": True, "ignore_eos": True})
    with urllib.request.urlopen(urllib.request.Request(f"{served.openai}/completions", body.encode()), timeout=60) as r:
        r.readline()
    deadline = time.monotonic() + 20
    while counters(served)["neoxrt_cancelled_total"] <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counters(served)["neoxrt_cancelled_total"] == before + 1


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory):
    """The default checkpoint with a chat template in its tokenizer_config.json, exported: the artifact carries it."""
    ckpt = tmp_path_factory.mktemp("chat-ckpt") / "ckpt"
    shutil.copytree(default_checkpoint(), ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>",
                                                            "tokenizer_class": "GPTNeoXTokenizer"}))
    out = tmp_path_factory.mktemp("chat") / "chat"
    export_checkpoint(ckpt, out, ExportOptions(attention="decomposed"), log=lambda *_: None)
    assert (out / "tokenizer_config.json").is_file()
    return ckpt, out


def test_chat_with_a_template_equals_the_generator_on_the_rendered_prompt(chat_artifact, tmp_path_factory):
    ckpt, art = chat_artifact
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    rendered = f"system: Be brief.\nuser: {PROMPT}\nassistant:"
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)  # rendered as transformers renders it
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    want = Generator.from_artifacts(art, threads=1).generate([rendered], max_new_tokens=10)
    srv = start_server(art, tmp_path_factory.mktemp("chat-tmp"), openai=True)
    try:
        chat = openai.OpenAI(base_url=srv.openai, api_key="unused", timeout=60, max_retries=0)
        got = chat.chat.completions.create(model="neoxrt", messages=messages, max_tokens=10, temperature=0)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want.text[0]
        assert got.usage.prompt_tokens == len(tok(rendered)["input_ids"])
        chunks = list(chat.chat.completions.create(model="neoxrt", messages=messages, max_completion_tokens=10,
                                                   temperature=0, stream=True))
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text[0]
        assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as err:
            chat.chat.completions.create(model="neoxrt", messages=[{"role": "robot", "content": "x"}])
        assert err.value.body["param"] == "messages[0].role"
    finally:
        stop_server(srv)
