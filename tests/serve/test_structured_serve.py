"""Structured outputs through the serving fronts: the OpenAI endpoint (its app and uvicorn in this process, on
127.0.0.1, in front of a running scheduler; the real `openai` client) takes `response_format` (json_object,
json_schema) and vLLM's `structured_outputs` on completions and chat; Triton's generate model takes the same as
JSON-text inputs. Every output validates; a bad schema, regex or grammar is answered 400 (Triton: an error
response) naming the problem, and the server goes on serving."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

import jsonschema
import numpy as np
import pytest
from test_fuzz_request import FakePb, _Request

from neoxrt.runtime import Generator
from neoxrt.runtime.scheduler import Scheduler

openai = pytest.importorskip("openai", reason="needs the dev extra (the openai client)")

PROMPT = "The state of the Union is"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "year": {"type": "integer", "minimum": 1776, "maximum": 2030}},
          "required": ["name", "year"], "additionalProperties": False}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def frontend(artifact, tmp_path_factory):
    from neoxrt.serve.openai_app import OpenAIFrontend

    folder = tmp_path_factory.mktemp("chat") / "art"
    import shutil

    shutil.copytree(artifact, folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    generator = Generator.from_artifacts(folder, threads=1, verify=False)
    scheduler = Scheduler(generator, max_batch=4)
    scheduler.start()
    app = OpenAIFrontend(scheduler, generator, "neoxrt", folder, "127.0.0.1", _free_port())
    app.start()
    yield app
    app.stop()
    scheduler.stop()


@pytest.fixture(scope="module")
def client(frontend):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{frontend.port}/v1", api_key="unused", timeout=60, max_retries=0)


def post(frontend, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{frontend.port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
    out = client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=60, temperature=1.0, seed=3, n=3,
                                    extra_body={"response_format": fmt})
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMA)
        assert choice.finish_reason == "stop"
    chat = client.chat.completions.create(model="neoxrt", messages=[{"role": "user", "content": "A record?"}],
                                          max_tokens=60, temperature=1.0, seed=1, response_format=fmt)
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    obj = client.chat.completions.create(model="neoxrt", messages=[{"role": "user", "content": "JSON?"}],
                                         max_tokens=40, response_format={"type": "json_object"})
    text = obj.choices[0].message.content
    assert text.startswith("{") and (obj.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


def test_structured_outputs_object_each_kind_and_streaming(client):
    for extra, ok in (({"regex": r"[A-Z][a-z]{2,8} (19|20)\d\d"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} (19|20)\d\d", t)),
                      ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
                      ({"grammar": 'root ::= "[" [0-9] ("," [0-9]){0,4} "]"'}, lambda t: re.fullmatch(r"\[\d(,\d){0,4}\]", t)),
                      ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None)):
        out = client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=60, temperature=1.0, seed=5, n=2,
                                        extra_body={"structured_outputs": extra})
        assert all(ok(c.text) and c.finish_reason == "stop" for c in out.choices), (extra, out.choices)
        stream = client.completions.create(model="neoxrt", prompt=PROMPT, max_tokens=60, stream=True,
                                           extra_body={"structured_outputs": extra})
        chunks = list(stream)
        assert ok("".join(c.choices[0].text for c in chunks if c.choices)) and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path,body,param,message", [
    ("/v1/completions", {"structured_outputs": {"regex": "(("}}, "structured_outputs", "unclosed group"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs", "nothing"),
    ("/v1/completions", {"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs", "nope"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ("/v1/completions", {"structured_outputs": []}, "structured_outputs", "must be an object"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                  "schema": {"type": "nope"}}}}, "response_format", "nope"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema", "with a name"),
    ("/v1/completions", {"response_format": {"type": "yaml"}}, "response_format", "type one of text"),
    ("/v1/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format", "not both"),
])
def test_bad_constraints_are_400_naming_the_problem_and_the_server_goes_on(frontend, path, body, param, message):
    base = {"model": "neoxrt", "max_tokens": 8,
            **({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"})}
    status, answer = post(frontend, path, {**base, **body})
    assert status == 400 and answer["error"]["param"] == param and message in answer["error"]["message"], answer
    assert "\n" not in answer["error"]["message"]
    status, answer = post(frontend, "/v1/completions", {"model": "neoxrt", "prompt": "Hi", "max_tokens": 2})
    assert status == 200 and len(answer["choices"][0]["text"]) > 0


@pytest.fixture(scope="module")
def backend(artifact):
    from neoxrt.serve.backend import TritonBackend

    backend = TritonBackend(FakePb, "neoxrt", artifact, max_batch=4, max_queue=8, threads=1)
    yield backend
    backend.stop()


def _send(backend, inputs: dict):
    request = _Request({k: np.array([v.encode() if isinstance(v, str) else v], dtype=object if isinstance(v, str)
                                    else np.int32) for k, v in inputs.items()})
    backend.submit(request)
    assert request.sender.done.wait(60)
    return request.sender.responses[-1]


def test_triton_generate_takes_the_same_as_json_text_inputs(backend):
    fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})
    for inputs in ({"structured_outputs": json.dumps({"json": SCHEMA})}, {"response_format": fmt}):
        final = _send(backend, {"text_input": PROMPT, "max_tokens": 60, **inputs})
        assert final.error is None and final.outputs["finish_reason"][0].decode() == "grammar"
        jsonschema.validate(json.loads(final.outputs["text_output"][0].decode()), SCHEMA)
    for inputs, message in (({"structured_outputs": '{"regex": "(("}'}, "structured_outputs.regex"),
                            ({"structured_outputs": "{not json"}, "structured_outputs must be JSON text"),
                            ({"response_format": '{"type": 3}'}, "response_format must be an object")):
        final = _send(backend, {"text_input": PROMPT, "max_tokens": 4, **inputs})
        assert final.error is not None and message in final.error.message and "\n" not in final.error.message
    assert _send(backend, {"text_input": "We", "max_tokens": 2}).error is None


def test_real_triton_generate_endpoint_takes_them(server):
    """Through a real tritonserver's generate extension (`neoxrt serve`): the JSON-text parameters reach the model."""
    status, body = server.generate(text_input=PROMPT, max_tokens=60, structured_outputs=json.dumps({"json": SCHEMA}))
    assert status == 200 and body["finish_reason"] == "grammar", body
    jsonschema.validate(json.loads(body["text_output"]), SCHEMA)
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    status, body = server.generate(text_input=PROMPT, max_tokens=60, temperature=1.0, seed=2,
                                   response_format=json.dumps(fmt))
    assert status == 200, body
    jsonschema.validate(json.loads(body["text_output"]), SCHEMA)
    status, body = server.generate(text_input=PROMPT, max_tokens=4, structured_outputs='{"regex": "(("}')
    assert status == 400 and "structured_outputs.regex" in body["error"], body
    assert server.ready() and server.generate(text_input="We", max_tokens=2)[0] == 200
