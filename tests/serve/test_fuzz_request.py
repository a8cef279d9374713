"""Fuzz (hypothesis): requests with every field of the served model's inputs present or not, of any tensor type
(int, float, bool, bytes), any count of values, and hostile values (NaN, infinities, negatives, huge, empty or
non-UTF-8 text), sent through `TritonBackend.submit` -- the Triton Python model's own code, with a stand-in for
`triton_python_backend_utils` -- into the running in-flight scheduler. The contract: one final error response
naming a field, or the generated tokens; and after every request a plain one still completes (the model stays
ready)."""

import threading

import numpy as np
import pytest
from fuzzing import budget, fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from neoxrt.serve.request import INPUTS

FINAL = 1
# request field -> the names its refusal may use (GenerationOptions' keyword, or the prompt's length check)
NAMES = {"max_tokens": ("max_tokens", "max_new_tokens"), "stop": ("stop", "stop_strings"),
         "text_input": ("text_input", "prompt", "token")}


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _Metric:
    def increment(self, value):
        assert value >= 0

    def set(self, value):
        pass


class _Family:
    COUNTER, GAUGE = "counter", "gauge"

    def __init__(self, name, description, kind):
        pass

    def Metric(self, labels):  # noqa: N802 (Triton's name)
        return _Metric()


class FakePb:
    """The parts of triton_python_backend_utils that neoxrt.serve.backend uses."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    MetricFamily = _Family
    Tensor = _Tensor

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.outputs = {t.name: t.array for t in output_tensors}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return None if name not in request.inputs else _Tensor(name, request.inputs[name])


class _Sender:
    def __init__(self):
        self.responses, self.done = [], threading.Event()

    def send(self, response, flags=0):
        self.responses.append(response)
        if flags & FINAL:
            self.done.set()

    def is_cancelled(self):
        return False


class _Request:
    def __init__(self, inputs):
        self.inputs, self.sender = inputs, _Sender()

    def get_response_sender(self):
        return self.sender


@pytest.fixture(scope="module")
def backend(artifact):
    from neoxrt.serve.backend import TritonBackend

    backend = TritonBackend(FakePb, "neoxrt", artifact, max_batch=4, max_queue=8, threads=1)
    yield backend
    backend.stop()


def _send(backend, inputs: dict) -> list:
    request = _Request(inputs)
    backend.submit(request)
    assert request.sender.done.wait(60), f"no final response for {inputs}"
    return request.sender.responses


HOSTILE = [float("nan"), float("inf"), -float("inf"), -1, 0, 1, 2, 3, 0.5, 1.5, 1e9, 2**40, True]
TEXTS = [b"We", b"The state of the Union", b"Tonight", b"", b"\xff\xfe", b"word " * 600, "Hi"]
DTYPES = [np.int32, np.int64, np.float32, np.float64, np.bool_, object]


def _array(values, dtype):
    if dtype is object:
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in values], dtype=object)
    with np.errstate(all="ignore"):
        try:
            return np.array(values, dtype=np.float64).astype(dtype)
        except (OverflowError, ValueError):
            return np.array([0] * len(values), dtype=dtype)


ONE_VALUE = st.tuples(st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=1), st.sampled_from(DTYPES))
ANY_COUNT = st.tuples(st.lists(st.sampled_from(HOSTILE), max_size=2), st.sampled_from(DTYPES))
FIELDS = sorted(f.name for f in INPUTS if f.name not in ("text_input", "stop"))
VALUE = st.one_of(ONE_VALUE, ONE_VALUE, ANY_COUNT).map(lambda p: _array(*p))
STOP = st.lists(st.sampled_from([b"", b"\n", b".", b"the"]), max_size=2).map(lambda v: np.array(v, dtype=object))
TEXT = st.sampled_from(range(len(TEXTS) + 2)).map(  # one of TEXTS, an int array, or no prompt
    lambda i: np.array([TEXTS[i]], dtype=object) if i < len(TEXTS) else np.array([1, 2], np.int32) if i == len(TEXTS) else None)
# the prompt (or none), and one or two other fields set
REQUESTS = st.tuples(TEXT,
                     st.dictionaries(st.sampled_from([*FIELDS, "stop"]), VALUE, min_size=1, max_size=2),
                     STOP).map(lambda t: {**({"text_input": t[0]} if t[0] is not None else {}),
                                          **{k: (t[2] if k == "stop" else v) for k, v in t[1].items()}})


@fuzz
@budget(100)
@given(inputs=REQUESTS)
def test_any_request_is_answered_by_name_and_the_model_stays_ready(backend, inputs):
    inputs.setdefault("max_tokens", np.array([3], np.int32))
    responses = _send(backend, inputs)
    final = responses[-1]
    if final.error is not None:
        message = final.error.message
        event("refused: " + message.split(" must ")[0].split(",")[0][:40])
        assert "\n" not in message and "Traceback" not in message, message
        names = [n for field in inputs for n in NAMES.get(field, (field,))] + ["text_input"]
        assert any(n in message for n in names), (inputs, message)
    else:
        event("answered")
        ids = [int(t) for r in responses for t in r.outputs["output_ids"]]
        assert all(0 <= t < 50304 for t in ids)
        assert final.outputs["finish_reason"][0].decode() in ("length", "stop_token", "stop_string")
    ok = _send(backend, {"text_input": np.array([b"We"], dtype=object), "max_tokens": np.array([2], np.int32)})
    assert ok[-1].error is None and len(ok[-1].outputs["output_ids"]) == 2
