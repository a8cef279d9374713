"""Fuzz (hypothesis): any structured_outputs value -- objects with any keys and JSON-ish values, regexes, grammars
and schemas built from hostile pieces -- is either compiled into a working constraint or refused with one
GrammarError line; nothing else escapes (no TypeError, no Rust panic), and a refused spec is not cached."""

import pytest
from fuzzing import budget, fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from neoxrt.assets import DEFAULT_TOKENIZER
from neoxrt.errors import GrammarError
from neoxrt.runtime.structured import KINDS, Grammars, StructuredOutputs

PIECES = ["(", ")", "[", "]", "{", "}", "*", "+", "?", "|", "\\", "\\d", "a", "é", "\x00", "{2,1}", "(?P<x>", "^", "$",
          ".", "::=", "root", '"', "'", " ", "\n", "%", "/", "start:", "\ufffd", "{999999}"]
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) |
                       st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) |
                       st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "$ref", "anyOf",
                                                        "pattern", "minLength", "maxItems", "required", "x"]),
                                       inner, max_size=3), max_leaves=8)
TEXTS = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
SCHEMAS = st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "maxLength", "maximum", "x"]),
                          st.one_of(st.sampled_from(["string", "integer", "object", "array", "nope"]),
                                    st.integers(-3, 5), JSONISH), max_size=3)
SPECS = st.one_of(
    st.builds(lambda r: {"regex": r}, TEXTS),
    st.builds(lambda g: {"grammar": "root ::= " + g}, TEXTS),
    st.builds(lambda c: {"choice": c}, st.lists(st.text(max_size=6), max_size=3)),
    st.builds(lambda j: {"json": j}, st.one_of(SCHEMAS, JSONISH, TEXTS)),
    st.builds(lambda k, v: {k: v}, st.sampled_from(KINDS), st.one_of(JSONISH, TEXTS)),
    st.dictionaries(st.sampled_from([*KINDS, "whitespace_pattern"]), JSONISH, max_size=2),
    JSONISH,
)


@pytest.fixture(scope="module")
def grammars():
    return Grammars(DEFAULT_TOKENIZER.read_text(encoding="utf-8"), 50304, 0, timeout_s=20.0)


@fuzz
@budget(150)
@given(value=SPECS)
def test_any_spec_compiles_or_is_refused_in_one_line(grammars, value):
    try:
        spec = StructuredOutputs.parse(value)
    except GrammarError as exc:
        event("refused by the check")
        assert "\n" not in str(exc) and str(exc).startswith("structured_outputs"), str(exc)
        return
    if spec is None:
        event("none")
        return
    try:
        constraint = grammars.constraint(spec)
    except GrammarError as exc:
        event("refused by the engine")
        assert "\n" not in str(exc) and str(exc).startswith(f"structured_outputs.{spec.kind}"), str(exc)
        assert spec not in grammars._cache
        return
    event("compiled")
    allowed = constraint.allowed()
    assert allowed.shape == (50304,) and allowed.any()  # at least EOS or a continuation
