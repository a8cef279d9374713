"""Structured outputs: every output parses and validates (JSON schema), matches (regex, grammar) or is one of the
choices -- sampled at temperature 1 across seeds on the embedded model and on a random-weights model; the grammar
completes within max_tokens (finish reason "grammar"); unconstrained rows are untouched; bad specs refused."""

import json
import re
import shutil

import jsonschema
import numpy as np
import pytest

from neox_testing import default_checkpoint
from neoxrt.errors import GrammarError, RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.model import NeoXConfig, random_model, read_config, save_checkpoint
from neoxrt.runtime import Generator
from neoxrt.runtime.structured import Grammars, StructuredOutputs, masked

QUIET = dict(log=lambda *_: None)
PROMPTS = ["The state of the Union is", "Give me a record:"]
# bounded: every string, array and number has a limit, so the compact output has a bounded token count
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["president", "senator", "citizen"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "role", "tags", "ok"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": -5, "maximum": 5},
                                     "p": {"anyOf": [{"type": "null"}, {"enum": [1, 2.5, "x"]}]}},
    "required": ["id", "p"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False}
DATE = r"(19|20)\d{2}-(0[1-9]|1[0-2])-[0-3]\d"
CHOICES = ["positive", "negative", "neutral", "it's \"mixed\""]
EBNF = 'root ::= "(" expr ")"\nexpr ::= num (("+" | "*") num){0,3}\nnum ::= [1-9] [0-9]{0,2}'
EBNF_RE = r"\([1-9][0-9]{0,2}([+*][1-9][0-9]{0,2}){0,3}\)"


def check(kind: str, spec, text: str) -> None:
    """The output satisfies its constraint (raises otherwise)."""
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    elif kind == "choice":
        assert text in spec, text
    elif kind == "grammar":
        assert re.fullmatch(EBNF_RE, text), text
    else:
        assert isinstance(json.loads(text), dict), text


CASES = [("json", PERSON), ("json", NESTED), ("regex", DATE), ("choice", CHOICES), ("grammar", EBNF)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The embedded model, and a random-weights model with its tokenizer and vocabulary (1 small layer)."""
    root = tmp_path_factory.mktemp("structured")
    export_checkpoint(default_checkpoint(), root / "default", ExportOptions(), **QUIET)
    config = read_config(default_checkpoint())
    small = NeoXConfig(**{**config.to_dict(), "num_layers": 1, "hidden_size": 64, "num_heads": 4,
                          "intermediate_size": 128})
    ckpt = save_checkpoint(random_model(small, seed=11), root / "ckpt-random")
    shutil.copyfile(default_checkpoint() / "tokenizer.json", ckpt / "tokenizer.json")
    export_checkpoint(ckpt, root / "random", ExportOptions(), **QUIET)
    return {"default": Generator.from_artifacts(root / "default", threads=2),
            "random": Generator.from_artifacts(root / "random", threads=2)}


@pytest.mark.parametrize("model", ["default", "random"])
@pytest.mark.parametrize("kind,spec", CASES, ids=["person", "nested", "regex", "choice", "grammar"])
def test_every_sampled_output_satisfies_its_constraint(artifacts, model, kind, spec):
    gen = artifacts[model]
    for seed in range(4):
        result = gen.generate(PROMPTS, max_new_tokens=120, temperature=1.0, seed=seed, num_return_sequences=2,
                              structured_outputs={kind: spec})
        for text, reason in zip(result.text, result.finish_reasons):
            assert reason in ("grammar", "stop_token"), (reason, text)  # finished, within max_new_tokens
            check(kind, spec, text)


@pytest.mark.parametrize("kind,spec", CASES, ids=["person", "nested", "regex", "choice", "grammar"])
def test_greedy_top_k_top_p_and_stream_satisfy_it(artifacts, kind, spec):
    gen = artifacts["default"]
    for options in (dict(), dict(temperature=0.7, top_k=5, seed=2), dict(temperature=1.3, top_p=0.9, seed=3)):
        result = gen.generate(PROMPTS, max_new_tokens=120, structured_outputs={kind: spec}, **options)
        for text in result.text:
            check(kind, spec, text)
    streamed = "".join(e.text for e in gen.stream(PROMPTS[:1], max_new_tokens=120, structured_outputs={kind: spec}))
    assert streamed == gen.generate(PROMPTS[:1], max_new_tokens=120, structured_outputs={kind: spec}).text[0]


def test_json_object_is_compact_and_an_object(artifacts):
    result = artifacts["default"].generate(PROMPTS, max_new_tokens=48, structured_outputs={"json_object": True},
                                           temperature=1.0, seed=5, num_return_sequences=3)
    for text, reason in zip(result.text, result.finish_reasons):
        if reason != "length":  # an unbounded object may run to max_new_tokens
            assert isinstance(json.loads(text), dict)
        assert not re.search(r"[{,:]\s|\s[},:]", text.replace('\\"', "")) or '"' in text  # no whitespace between tokens
    person = artifacts["default"].generate(PROMPTS, max_new_tokens=120, structured_outputs={"json": PERSON}).text
    assert all(json.dumps(json.loads(t), separators=(",", ":"), ensure_ascii=False) == t for t in person)


def test_schema_as_json_text_and_the_option_object(artifacts):
    gen = artifacts["default"]
    a = gen.generate(PROMPTS[0], max_new_tokens=120, structured_outputs={"json": json.dumps(PERSON)})
    b = gen.generate(PROMPTS[0], max_new_tokens=120, structured_outputs=StructuredOutputs.parse({"json": PERSON}))
    assert a.ids == b.ids


def test_unconstrained_rows_are_untouched(artifacts):
    """masked() leaves rows without a constraint bit-identical; a constrained row beside them changes nothing."""
    gen = artifacts["default"]
    logits = np.random.default_rng(0).standard_normal((3, 50304)).astype(np.float32)
    c = gen.grammars.constraint(StructuredOutputs.parse({"choice": ["yes", "no"]}))
    out = masked(logits, [None, c, None])
    assert np.array_equal(out[[0, 2]], logits[[0, 2]]) and np.isfinite(out[1]).sum() == c.allowed().sum() < 10
    assert masked(logits, [None, None, None]) is logits


def test_finishes_with_grammar_and_caches_the_compiled_grammar(artifacts):
    gen = artifacts["default"]
    result = gen.generate(PROMPTS[0], max_new_tokens=50, structured_outputs={"choice": ["yes", "no"]})
    assert result.finish_reasons == ["grammar"] and result.text[0] in ("yes", "no")
    cache = gen.grammars._cache
    before = len(cache)
    gen.generate(PROMPTS[0], max_new_tokens=50, structured_outputs={"choice": ["yes", "no"]})
    assert len(cache) == before


def test_stop_strings_still_apply(artifacts):
    gen = artifacts["default"]
    free = gen.generate(PROMPTS[0], max_new_tokens=120, structured_outputs={"json": PERSON}).text[0]
    stop = free[free.index(",") + 1:free.index(",") + 4]  # a piece of the output after its first comma
    cut = gen.generate(PROMPTS[0], max_new_tokens=120, structured_outputs={"json": PERSON}, stop_strings=[stop])
    assert cut.finish_reasons == ["stop_string"] and free.startswith(cut.text[0]) and stop not in cut.text[0]


@pytest.mark.parametrize("value,message", [
    ({"regex": "(abc"}, "structured_outputs.regex: .*unclosed group"),
    ({"json": {"type": "nope"}}, "structured_outputs.json: .*nope"),
    ({"json": "{not json"}, "structured_outputs.json: not valid JSON"),
    ({"json": [1]}, "must be a JSON schema"),
    ({"json": {"enum": {1, 2}}}, "structured_outputs.json must be JSON data"),
    ({"json": {"maximum": float("nan")}}, "structured_outputs.json must be JSON data"),
    ({"grammar": "root ::= foo"}, "structured_outputs.grammar: .*foo"),
    ({"choice": []}, "non-empty list of non-empty strings"),
    ({"choice": ["a", 3]}, "non-empty list of non-empty strings"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of .* got regex, choice"),
    ({}, "exactly one of .* got none"),
    ({"json_object": 1}, "json_object must be true"),
    ({"whitespace_pattern": " "}, "unknown key 'whitespace_pattern'"),
    ("json", "must be an object"),
])
def test_bad_specs_are_refused_in_one_line(artifacts, value, message):
    with pytest.raises(GrammarError, match=message) as info:
        artifacts["default"].generate(PROMPTS[0], max_new_tokens=4, structured_outputs=value)
    assert "\n" not in str(info.value)


def test_beam_search_is_refused_and_a_slow_compile_too(artifacts):
    gen = artifacts["default"]
    with pytest.raises(RuntimeShapeError, match="not beam search"):
        gen.generate(PROMPTS[0], max_new_tokens=4, num_beams=2, structured_outputs={"regex": "a+"})
    with pytest.raises(RuntimeShapeError, match="do not combine with bad_words_ids or no_repeat_ngram_size"):
        gen.generate(PROMPTS[0], max_new_tokens=4, no_repeat_ngram_size=1, structured_outputs={"regex": "a+"})
    slow = Grammars(gen.tokenizer.to_str(), 50304, 0, timeout_s=1e-6)  # any compile takes longer
    with pytest.raises(GrammarError, match="took longer than 1e-06 s"):
        slow.constraint(StructuredOutputs.parse({"json": NESTED}))
    assert not slow._cache  # refused, not kept: the same spec is refused again
    slow.timeout_s = 30.0
    assert slow.constraint(StructuredOutputs.parse({"json": NESTED})).allowed().any()


def test_eos_and_pad_token_id_as_transformers_takes_them(artifacts):
    gen = artifacts["default"]
    free = gen.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True).ids[0]
    third = free[2]
    for eos in (third, [third, 10**4 + 7]):
        result = gen.generate(PROMPTS[0], max_new_tokens=12, eos_token_id=eos)
        assert result.ids[0] == free[:3] and result.finish_reasons == ["stop_token"]
    padded = gen.generate(PROMPTS, max_new_tokens=6, pad_token_id=1, ignore_eos=True)
    assert padded.ids == gen.generate(PROMPTS, max_new_tokens=6, ignore_eos=True).ids  # padding is masked
    for bad, message in (("x", "eos_token_id must be lists of token ids"), ([-1], "eos_token_id")):
        with pytest.raises(RuntimeShapeError, match=message):
            gen.generate(PROMPTS[0], max_new_tokens=2, eos_token_id=bad)
    with pytest.raises(RuntimeShapeError, match="pad_token_id must be one token id"):
        gen.generate(PROMPTS[0], max_new_tokens=2, pad_token_id=[1, 2])


@pytest.fixture(scope="module")
def drafted(artifacts, tmp_path_factory):
    """The embedded model with the random-weights model as its draft (same tokenizer): most guesses wrong."""
    gen = artifacts["default"]
    pair = Generator(gen.session, gen.manifest, gen.tokenizer)
    pair.attach_draft(artifacts["random"])
    return pair


@pytest.mark.parametrize("kind,spec", CASES, ids=["person", "nested", "regex", "choice", "grammar"])
def test_speculative_decoding_under_a_constraint(artifacts, drafted, kind, spec):
    """Greedy: the same tokens as without guessing (the constraint rolled back exactly after every rejected
    guess); sampling: every output satisfies the constraint."""
    gen = artifacts["default"]
    plain = gen.generate(PROMPTS, max_new_tokens=120, structured_outputs={kind: spec})
    for speculative in (dict(prompt_lookup_tokens=4), dict(num_draft_tokens=4)):
        runner = drafted if "num_draft_tokens" in speculative else gen
        guessed = runner.generate(PROMPTS, max_new_tokens=120, structured_outputs={kind: spec}, **speculative)
        assert guessed.ids == plain.ids and guessed.finish_reasons == plain.finish_reasons
        if min(len(i) for i in plain.ids) > 8:  # long enough for guessing rounds (a choice's one token is not)
            assert runner.spec_stats["rounds"] > 0 and runner.spec_stats["drafted"] > runner.spec_stats["accepted"]
        for seed in range(2):
            sampled = runner.generate(PROMPTS, max_new_tokens=120, structured_outputs={kind: spec}, temperature=1.0,
                                      seed=seed, **speculative)
            for text in sampled.text:
                check(kind, spec, text)


def test_a_draft_guess_the_grammar_refuses_ends_the_run(artifacts):
    """masked_guesses: position 0 masked; after a refused guess the later positions are left as they came, and the
    constraint is back where it started."""
    gen = artifacts["default"]
    c = gen.grammars.constraint(StructuredOutputs.parse({"choice": ["yes", "yes sir"]}))
    yes = gen.tokenizer.encode("yes").ids[0]
    before = c.allowed().copy()
    logits = np.zeros((1, 3, 50304), np.float32)
    from neoxrt.runtime.structured import masked_guesses

    bad = int(np.flatnonzero(~before)[0])
    out = masked_guesses(logits, [c], np.array([[bad, yes]]))
    assert np.isinf(out[0, 0]).sum() == (~before).sum() and np.isfinite(out[0, 1:]).all()
    out = masked_guesses(logits, [c], np.array([[yes, 0]]))
    after = np.isfinite(out[0, 1])
    assert after[0] and 1 < after.sum() < 100  # after "yes": EOS, or on to " sir"
    assert np.array_equal(c.allowed(), before)


class Collect:
    def __init__(self):
        self.ids, self.reason = {}, {}

    def __call__(self, event):
        self.ids.setdefault(event.row, []).append(event.token_id)
        if event.finish_reason:
            self.reason[event.row] = event.finish_reason


MIXED = [  # (prompt, options): constrained and unconstrained rows side by side, greedy and sampled
    ("The state of the Union is", dict(max_new_tokens=20)),
    ("Give me a record:", dict(max_new_tokens=120, temperature=1.0, seed=4, structured_outputs={"json": PERSON})),
    ("We", dict(max_new_tokens=16, temperature=0.9, seed=1)),
    ("Sentiment:", dict(max_new_tokens=20, structured_outputs={"choice": CHOICES})),
    ("Date:", dict(max_new_tokens=30, temperature=1.0, top_k=40, seed=2, structured_outputs={"regex": DATE})),
    ("Our economy", dict(max_new_tokens=24, temperature=1.2, top_p=0.9, seed=3)),
]


def test_mixed_batch_rows_get_their_alone_tokens(artifacts):
    """In-flight batching: each row carries its own constraint or none; every row (constrained or not) gets the
    tokens it gets alone, so a constrained neighbour changes nothing for an unconstrained one."""
    from neoxrt.runtime.scheduler import Scheduler

    gen = artifacts["default"]
    sched, got = Scheduler(gen, max_batch=4), Collect()
    rids = []
    for prompt, options in MIXED:
        rids.append(sched.submit(prompt, got, **options))
        sched.step()
    for _ in range(400):
        if not (sched.stats.active or sched.stats.queued):
            break
        sched.step()
    assert sched.stats.row_steps > sched.stats.steps
    for rid, (prompt, options) in zip(rids, MIXED):
        alone = gen.generate([prompt], **options)
        assert got.ids[rid] == alone.ids[0] and got.reason[rid] == alone.finish_reasons[0], prompt
        if "structured_outputs" in options:
            ((kind, spec),) = options["structured_outputs"].items()
            check(kind, spec, gen.tokenizer.decode(got.ids[rid]))


class _Failing:
    """A row's constraint that raises at its `after`-th token (as llguidance does when a grammar hits one of its
    limits mid-generation); otherwise the real one."""

    def __init__(self, real, after: int):
        self.real, self.left = real, after

    def advance(self, token):
        self.left -= 1
        if self.left <= 0:
            raise GrammarError("the grammar failed here")
        return self.real.advance(token)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_row_whose_grammar_fails_fails_alone(artifacts, greedy):
    """A constraint that raises mid-generation ends its own request (on_error, counted as failed); its
    neighbours, constrained or not, get their alone tokens."""
    from neoxrt.runtime.scheduler import Scheduler

    gen = artifacts["default"]
    sched, got, errors = Scheduler(gen, max_batch=4), Collect(), {}
    options = dict(max_new_tokens=30) if greedy else dict(max_new_tokens=30, temperature=0.9, seed=2)
    bad = sched.submit("Give me a record:", got, on_error=lambda e: errors.setdefault("bad", e),
                       structured_outputs={"json": PERSON}, **options)
    sched._queue[-1].book.constraints[0] = _Failing(sched._queue[-1].book.constraints[0], after=3)
    others = [("We", dict(max_new_tokens=20)), ("Sentiment:", dict(max_new_tokens=20, structured_outputs={"choice": CHOICES})),
              ("Our economy", dict(max_new_tokens=16, temperature=1.0, seed=5))]
    rids = [sched.submit(prompt, got, **o) for prompt, o in others]
    for _ in range(200):
        if not (sched.stats.active or sched.stats.queued):
            break
        sched.step()
    assert str(errors["bad"]) == "the grammar failed here" and len(got.ids[bad]) == 2 and sched.stats.failed == 1
    for rid, (prompt, o) in zip(rids, others):
        assert got.ids[rid] == gen.generate([prompt], **o).ids[0], prompt


def test_a_choice_list_longer_than_a_parser_row(artifacts):
    """3000 choices (llguidance caps an Earley row at 2000 items: the choices are one lexeme instead) and choices
    that prefix each other: every output is one of them."""
    gen = artifacts["default"]
    many = [f"option number {k}" for k in range(3000)]
    for choices in (many, ["a", "ab", "abc the people"], CHOICES):
        for options in (dict(), dict(temperature=1.0, seed=3)):
            out = gen.generate(["We", "Sentiment:"], max_new_tokens=12, structured_outputs={"choice": choices}, **options)
            assert all(text in choices for text in out.text), (out.text, options)


def test_scheduler_refuses_a_bad_spec_at_submit(artifacts):
    from neoxrt.runtime.scheduler import Scheduler

    sched = Scheduler(artifacts["default"], max_batch=2)
    with pytest.raises(GrammarError, match="structured_outputs.regex"):
        sched.submit("Hi", lambda e: None, max_new_tokens=4, structured_outputs={"regex": "(("})
    assert sched.stats.queued == 0 and sched.stats.requests == 0


def test_cli_format_flags(artifacts, tmp_path, capsys):
    from neox_testing import assert_refused
    from neoxrt.cli import main

    folder = str(artifacts["default"].session.path.parent)  # the artifact folder (model.onnx's)
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    grammar = tmp_path / "expr.gbnf"
    grammar.write_text(EBNF)
    for flags, kind, spec in ((["--json-schema", str(schema)], "json", PERSON), (["--regex", DATE], "regex", DATE),
                              (["--choice", CHOICES[0], "--choice", CHOICES[1]], "choice", CHOICES[:2]),
                              (["--grammar", str(grammar)], "grammar", EBNF), (["--json-object"], "json_object", None)):
        code = main(["generate", folder, "--prompt", PROMPTS[0], "--max-new-tokens", "120", "--do-sample", "--seed", "3",
                     "--json", *flags])
        out = json.loads(capsys.readouterr().out)
        assert code == 0
        if out["finish_reasons"][0] != "length":
            check(kind, spec, out["text"][0])
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 5}')
    assert_refused("generate", [
        ([folder, "--prompt", "Hi", "--regex", "(("], "--regex: "),
        ([folder, "--prompt", "Hi", "--json-schema", str(bad)], "--json-schema: type must be a string"),
        ([folder, "--prompt", "Hi", "--json-schema", str(tmp_path / "none.json")], "--json-schema: expected a readable"),
        ([folder, "--prompt", "Hi", "--grammar", str(bad)], "--grammar: "),
        ([folder, "--prompt", "Hi", "--regex", "a", "--json-object"], "not allowed with argument"),
        ([folder, "--prompt", "Hi", "--regex", "a", "--num-beams", "2"], "not beam search"),
    ], tmp_path, capsys)


def test_a_constraint_per_prompt(artifacts):
    """A list: each prompt its own constraint (None: free), for each of its num_return_sequences."""
    gen = artifacts["default"]
    specs = [{"choice": CHOICES}, None, {"regex": DATE}]
    prompts = PROMPTS + ["Today is"]
    result = gen.generate(prompts, max_new_tokens=30, temperature=1.0, seed=9, num_return_sequences=2,
                          structured_outputs=specs)
    for k in range(2):
        check("choice", CHOICES, result.text[k])
        check("regex", DATE, result.text[4 + k])
    assert len(result.ids) == 6 and result.finish_reasons[:2] == result.finish_reasons[4:] == ["grammar"] * 2
    greedy = gen.generate(prompts, max_new_tokens=30, structured_outputs=specs)
    assert greedy.ids[1] == gen.generate([prompts[1]], max_new_tokens=30).ids[0]  # the free row is untouched
    for bad, message in (([{"regex": "a"}], "holds 1 constraints; expected one per prompt \\(3\\)"),
                         ([], "non-empty list with one per prompt")):
        with pytest.raises(RuntimeShapeError, match=message):
            gen.generate(prompts, max_new_tokens=4, structured_outputs=bad)
        with pytest.raises(RuntimeShapeError, match=message):
            gen.generate(prompts, max_new_tokens=4, temperature=1.0, num_return_sequences=2, structured_outputs=bad)


# bounded schemas exercising JSON Schema's keywords: each must compile, and every sampled output validate
COVERAGE = {
    "const_enum": {"type": "object", "properties": {"v": {"const": 3}, "e": {"enum": ["a", 1, None, True, 2.5]}},
                   "required": ["v", "e"], "additionalProperties": False},
    "ref_defs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
                                  "required": ["x"], "additionalProperties": False}},
                 "type": "array", "items": {"$ref": "#/$defs/pt"}, "minItems": 1, "maxItems": 3},
    "one_any_of": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                             {"type": "string", "pattern": "^[a-z]{2,4}$"}]},
    "nullable_optional": {"type": "object", "properties": {
        "a": {"type": ["string", "null"], "maxLength": 6}, "b": {"type": "boolean"},
        "c": {"type": "integer", "minimum": 0, "maximum": 1}}, "required": ["a"], "additionalProperties": False},
    "exclusive_bounds": {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0,
                                                                "exclusiveMaximum": 10}},
                         "required": ["n"], "additionalProperties": False},
    "formats": {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                                 "u": {"type": "string", "format": "uuid"}},
                "required": ["d", "u"], "additionalProperties": False},
    "nested_arrays": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "string", "enum": ["x", "y"]}}},
    "all_of": {"allOf": [{"type": "object", "properties": {"k": {"type": "integer", "minimum": 1, "maximum": 5}},
                          "required": ["k"]},
                         {"type": "object", "properties": {"k": {"type": "integer"}}, "additionalProperties": False}]},
}


@pytest.mark.parametrize("name", sorted(COVERAGE))
def test_schema_keywords_compile_and_every_output_validates(artifacts, name):
    schema = COVERAGE[name]
    for model in ("default", "random"):
        for seed in range(3):
            result = artifacts[model].generate(PROMPTS, max_new_tokens=120, temperature=1.0, seed=seed,
                                               num_return_sequences=2, structured_outputs={"json": schema})
            for text, reason in zip(result.text, result.finish_reasons):
                assert reason in ("grammar", "stop_token"), (model, reason, text)
                jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker(("date", "uuid")))


def test_a_number_has_no_digit_limit(artifacts):
    """What "bounded" excludes: a JSON number's fraction (and format "time"'s fractional seconds) has no length limit
    in the grammar, so on a random-weights model it may run to max_new_tokens (the output is then a valid prefix,
    finish reason length). Integers with a range, enums, strings with maxLength and arrays with maxItems are the
    bounded kinds."""
    schema = {"type": "object", "properties": {"c": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["c"]}
    result = artifacts["default"].generate(PROMPTS[0], max_new_tokens=40, temperature=1.0, seed=0,
                                           structured_outputs={"json": schema})
    assert result.text[0].startswith('{"c":') and result.finish_reasons[0] in ("length", "grammar", "stop_token")


def test_constraints_from_many_threads_at_once(artifacts):
    """submit() compiles on its callers' threads (HTTP handlers, Triton's): concurrent requests for one spec and
    for new ones each get a working constraint."""
    from concurrent.futures import ThreadPoolExecutor

    grammars = Grammars(artifacts["default"].tokenizer.to_str(), 50304, 0)
    specs = [StructuredOutputs.parse({"regex": f"[a-z]{{{k % 4 + 1}}}"}) for k in range(32)]
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(grammars.constraint, specs))
    assert all(c.allowed().any() and not c.finished for c in made) and len(grammars._cache) == 4


@pytest.mark.parametrize("kind,spec", CASES + [("json_object", True)], ids=["person", "nested", "regex", "choice", "grammar",
                                                                          "json_object"])
def test_accepts_is_the_masks_verdict_on_every_token(artifacts, kind, spec):
    """Constraint.accepts (llguidance's one-token check; where bytes are forced, the forced token) says, for every
    token of every state along sampled outputs, what llguidance's mask says: the sampler's shortcut relies on it."""
    gen = artifacts["default"]
    rng = np.random.default_rng(3)
    states = 0
    for _ in range(8):
        masks, checks = (gen.grammars.constraint(StructuredOutputs.parse({kind: spec})) for _ in range(2))
        while not masks.finished and states < 120:
            allowed = masks.allowed()
            verdict = np.array([checks.accepts(t) for t in range(masks.vocab)])
            assert np.array_equal(verdict, allowed), np.flatnonzero(verdict != allowed)[:5]
            token = int(rng.choice(np.flatnonzero(allowed)))
            masks.advance(token)
            checks.advance(token)
            states += 1
    assert states >= 8  # at least one state per output


@pytest.mark.parametrize("kind,spec", CASES, ids=["person", "nested", "regex", "choice", "grammar"])
def test_greedy_checking_the_choice_first_is_greedy_masking_every_step(artifacts, kind, spec, monkeypatch):
    from neoxrt.runtime import sampling

    for model in ("default", "random"):
        fast = artifacts[model].generate(PROMPTS, max_new_tokens=120, structured_outputs={kind: spec})
        with monkeypatch.context() as m:
            m.setattr(sampling, "checks_first", lambda options: False)
            every = artifacts[model].generate(PROMPTS, max_new_tokens=120, structured_outputs={kind: spec})
        assert fast.ids == every.ids and fast.finish_reasons == every.finish_reasons


class _Banning:
    """A constraint stand-in: a fixed set of banned tokens."""

    finished = False

    def __init__(self, banned: np.ndarray):
        self._banned = banned

    def banned(self) -> np.ndarray:
        return self._banned

    def accepts(self, token: int) -> bool:
        return not self._banned[int(token)]

    def forced(self) -> int:
        allowed = np.flatnonzero(~self._banned)
        return int(allowed[0]) if len(allowed) == 1 else -1


def test_sampling_checking_the_choice_first_draws_from_the_masked_distribution():
    """Rejection sampling: a draw the constraint allows is kept, a refused one drawn again from the masked
    logits -- the frequencies are the masked softmax's (with a repetition penalty too: it commutes with the mask)."""
    from neoxrt.runtime.sampling import GenerationOptions, constrained_next_tokens, softmax

    rng = np.random.default_rng(5)
    logits = np.tile(rng.normal(size=(1, 12)) * 1.5, (30000, 1)).astype(np.float32)
    banned = np.zeros(12, bool)
    banned[[0, 3, 4, 9]] = True
    seen = [np.array([1, 2])] * len(logits)
    for options in (GenerationOptions(temperature=0.8), GenerationOptions(temperature=1.2, repetition_penalty=1.3)):
        draws = constrained_next_tokens(logits, [_Banning(banned)] * len(logits), seen, options, np.random.default_rng(1))
        assert not banned[draws].any()
        want = np.where(banned, -np.inf, logits[0]).astype(np.float64)
        if options.repetition_penalty != 1.0:
            want[[1, 2]] = np.where(want[[1, 2]] < 0, want[[1, 2]] * 1.3, want[[1, 2]] / 1.3)
        expected = softmax(want[None] / options.temperature)[0]
        assert np.abs(np.bincount(draws, minlength=12) / len(draws) - expected).max() < 0.012
    # the grammar allows only the three least likely tokens (a few per cent of the mass): most rows exhaust their
    # further draws and are masked, the rest keep a later draw -- together still the masked distribution
    unlikely = np.argsort(logits[0])[:3]
    banned = np.ones(12, bool)
    banned[unlikely] = False
    options = GenerationOptions(temperature=1.0)
    draws = constrained_next_tokens(logits, [_Banning(banned)] * len(logits), seen, options, np.random.default_rng(2))
    assert set(np.unique(draws)) <= set(unlikely.tolist())
    expected = softmax(np.where(banned, -np.inf, logits[0]).astype(np.float64)[None])[0]
    assert np.abs(np.bincount(draws, minlength=12) / len(draws) - expected).max() < 0.012


def test_greedy_under_a_constraint_takes_the_best_allowed_token_near_or_far_down_the_order():
    """A refused greedy choice tries the next-best tokens in order (ties: the lower id, as argmax), then masks:
    either way the masked argmax."""
    from neoxrt.runtime.sampling import RETRIES, GenerationOptions, constrained_next_tokens

    logits = np.array([[0.0, 5.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, -1.0]], np.float32)
    order = [1, 2, 3, 4, 5, 6, 7, 8, 0, 9]
    for allowed_rank in (0, 1, 2, RETRIES, RETRIES + 1, 9):  # near: a candidate; far: past them, masked
        banned = np.ones(10, bool)
        banned[order[allowed_rank:]] = False
        got = constrained_next_tokens(logits, [_Banning(banned)], [np.array([], np.int64)],
                                      GenerationOptions(temperature=0.0), None)
        assert got[0] == np.where(banned, -np.inf, logits[0]).argmax() == order[allowed_rank]


@pytest.mark.parametrize("options", [dict(), dict(temperature=1.0, top_k=5, seed=4)], ids=["greedy", "top-k"])
def test_log_probabilities_under_a_constraint_are_the_models_own(artifacts, options):
    """Masking in place (no unmasked logits kept) is only for rows that report no log-probabilities: under a
    constraint, a reported log p is the model's, never the mask's -- the forced first token `{"` would have log p 0
    under the mask -- alone and in the scheduler's batch beside a row that reports none."""
    from neoxrt.runtime.scheduler import Scheduler

    gen = artifacts["default"]
    kwargs = dict(max_new_tokens=12, structured_outputs={"json": PERSON}, logprobs=2, **options)
    alone = gen.generate([PROMPTS[0]], **kwargs)
    logps = [t["logprob"] for t in alone.logprobs[0]]
    assert logps[0] < -1e-3 and all(np.isfinite(logps)), logps[:3]
    sched, seen = Scheduler(gen, max_batch=2), []
    sched.submit(PROMPTS[1], lambda e: None, **{**kwargs, "logprobs": None})
    sched.submit(PROMPTS[0], lambda e: seen.append(e.logprob), **kwargs)
    for _ in range(100):
        if not (sched.stats.active or sched.stats.queued):
            break
        sched.step()
    assert len(seen) == len(logps) and np.allclose(seen, logps, atol=1e-4)


def test_a_row_its_grammar_forces_takes_the_token_without_a_draw():
    """Every row forced (the mask is one token): that token, whatever the options, and nothing drawn -- so one row
    draws the same uniforms whichever loop runs it (the Generator's, which feeds forced tokens together, or the
    scheduler's). A row beside it with a choice: drawn as before."""
    from neoxrt.runtime.sampling import GenerationOptions, constrained_next_tokens

    logits = np.random.default_rng(3).normal(size=(2, 12)).astype(np.float32)
    one = np.ones(12, bool)
    one[7] = False
    seen = [np.array([1, 2])] * 2
    for options in (GenerationOptions(temperature=0.0), GenerationOptions(temperature=1.0),
                    GenerationOptions(temperature=0.7, top_k=3, repetition_penalty=1.2)):
        rng = np.random.default_rng(9)
        assert constrained_next_tokens(logits[:1], [_Banning(one)], seen[:1], options, rng).tolist() == [7]
        assert rng.random() == np.random.default_rng(9).random()
    rng = np.random.default_rng(9)
    both = constrained_next_tokens(logits, [_Banning(one), None], seen, GenerationOptions(temperature=1.0), rng)
    assert both[0] == 7 and rng.random() != np.random.default_rng(9).random()


def _counting_steps(gen, monkeypatch):
    """Patch `gen`'s session so that every decoder it makes counts its steps in the returned list."""
    steps, make = [0], gen.session.decoder

    def decoder(*args, **kwargs):
        d = make(*args, **kwargs)
        step = d.step

        def counted(*a, **k):
            steps[0] += 1
            return step(*a, **k)
        d.step = counted
        return d
    monkeypatch.setattr(gen.session, "decoder", decoder)
    return steps


@pytest.mark.parametrize("kind,spec", CASES, ids=["person", "nested", "regex", "choice", "grammar"])
def test_forced_tokens_are_fed_together_and_change_nothing(artifacts, kind, spec, monkeypatch):
    """Jump-forward at batch 1: the tokens a grammar forces (`{"name":"`, `","age":`) go to the model in one step
    with the token before them -- one step fewer for each, the same tokens as one step a token (greedy, and
    sampled with the same seed: a forced token draws nothing either way)."""
    from neoxrt.runtime import generator

    gen = artifacts["default"]
    for options in (dict(), dict(temperature=1.0, seed=2), dict(temperature=0.8, top_p=0.9, seed=5)):
        kwargs = dict(max_new_tokens=120, structured_outputs={kind: spec}, **options)
        steps = _counting_steps(gen, monkeypatch)
        together = gen.generate([PROMPTS[1]], **kwargs)
        fed, steps[0] = steps[0], 0
        with monkeypatch.context() as m:
            m.setattr(generator, "_take_forced", lambda book: _none())
            apart = gen.generate([PROMPTS[1]], **kwargs)
        assert together.ids == apart.ids and together.finish_reasons == apart.finish_reasons
        ids = together.ids[0]
        c = gen.grammars.constraint(StructuredOutputs.parse({kind: spec}))
        forced = 0
        for token in ids:
            forced += c.forced() >= 0
            c.advance(token)
        assert steps[0] == len(ids) and fed == len(ids) - forced
        if kind == "json":
            assert forced >= 5  # the keys


def _none():
    """`_take_forced` turned off: takes nothing (a generator returning [])."""
    return []
    yield
