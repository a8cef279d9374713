"""Grammar engines measured with the GPT-NeoX tokenizer (the embedded Pythia's tokenizer.json): compile time per
grammar, per-token mask time while a greedy walk through each grammar runs, and which test schemas compile.

    python -m neoxrt.bench.structured_engines [--engine llguidance|xgrammar] [--tokens 64]

Prints one JSON line per (engine, grammar) and a summary line. The walk picks the lowest allowed token id each step
(no model), so both engines walk the same token path where they allow the same tokens. xgrammar's package
imports torch; run it with an interpreter that has torch (the runtime itself never imports it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import time
from importlib import resources

import numpy as np

# (name, kind, spec): the grammar shapes the issue names, a nested schema and a few coverage probes
GRAMMARS = (
    ("person", "json", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                          "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                          "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                                   "maxItems": 3}},
                        "required": ["name", "age", "tags"], "additionalProperties": False}),
    ("nested", "json", {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"id": {"type": "integer"}, "sub": {"type": "object", "properties": {
                "x": {"type": "number"}, "y": {"type": ["string", "null"], "maxLength": 8}}, "required": ["x", "y"]}},
            "required": ["id", "sub"]}}}, "required": ["items"]}),
    ("pattern", "json", {"type": "object", "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                                                           "when": {"type": "string", "format": "date-time"}},
                         "required": ["date", "when"]}),
    ("anyof_ref", "json", {"$defs": {"leaf": {"type": "integer"}},
                           "anyOf": [{"$ref": "#/$defs/leaf"}, {"type": "array", "items": {"$ref": "#/$defs/leaf"},
                                                                 "maxItems": 3}]}),
    ("json_object", "json", {"type": "object"}),
    ("regex", "regex", r"\d{3}-[a-z]{2,5}( [A-Z][a-z]+){0,2}"),
    ("choice", "choice", ["positive", "negative", "neutral"]),
    ("ebnf", "grammar", 'root ::= "(" expr ")"\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+'),
)


def tokenizer_path() -> str:
    return str(resources.files("neoxrt.assets") / "pythia-14m-sotu" / "tokenizer.json")


VOCAB = 50304  # the embedded model's logits width (the tokenizer's 50277 tokens, padded)


class Llguidance:
    name = "llguidance"

    def __init__(self):
        import llguidance

        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(tokenizer_path(), n_vocab=VOCAB)
        self.version = llguidance.__version__

    def compile(self, kind, spec):
        ll = self.ll
        if kind == "json":
            text = ll.LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults={"whitespace_flexible": False})
        elif kind == "choice":
            text = ll.grammar_from("choice", spec)
        elif kind == "grammar":
            text = ll.grammar_from("grammar", spec)
        else:
            text = ll.grammar_from(kind, spec)
        matcher = ll.LLMatcher(self.tok, text, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def walk(self, matcher, tokens: int) -> tuple[list[float], str]:
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        mask = allocate_token_bitmask(1, VOCAB)
        times, out = [], []
        for _ in range(tokens):
            if matcher.is_stopped():
                break
            t0 = time.perf_counter()
            fill_next_token_bitmask(matcher, mask)
            times.append(time.perf_counter() - t0)
            allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:VOCAB])
            token = int(allowed[0])
            out.append(token)
            matcher.consume_token(token)
        return times, self.tok.decode_str(out)


class Xgrammar:
    name = "xgrammar"

    def __init__(self):
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xg = xgrammar
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path(), eos_token="<|endoftext|>")
        info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=VOCAB)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.version = importlib.metadata.version("xgrammar")

    def compile(self, kind, spec):
        c = self.compiler
        if kind == "json":
            compiled = c.compile_json_schema(json.dumps(spec), any_whitespace=False)
        elif kind == "regex":
            compiled = c.compile_regex(spec)
        elif kind == "choice":
            compiled = c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
        else:
            compiled = c.compile_grammar(spec)
        return self.xg.GrammarMatcher(compiled)

    def walk(self, matcher, tokens: int) -> tuple[list[float], str]:
        mask = self.xg.allocate_token_bitmask(1, VOCAB)
        times, out = [], []
        for _ in range(tokens):
            if matcher.is_terminated():
                break
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            bits = mask[0].numpy().view(np.uint8)
            allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little")[:VOCAB])
            token = int(allowed[0])
            out.append(token)
            matcher.accept_token(token)
        return times, self.tokenizer.decode(out)


ENGINES = {"llguidance": Llguidance, "xgrammar": Xgrammar}


def measure(engine_name: str, tokens: int, repeats: int = 3) -> list[dict]:
    t0 = time.perf_counter()
    engine = ENGINES[engine_name]()
    setup = time.perf_counter() - t0
    rows = []
    for name, kind, spec in GRAMMARS:
        row = {"engine": engine.name, "version": engine.version, "grammar": name, "setup_s": round(setup, 3)}
        try:
            compiles = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                matcher = engine.compile(kind, spec)
                compiles.append(time.perf_counter() - t0)
            times, text = engine.walk(matcher, tokens)
        except Exception as exc:  # coverage: the engine refused the grammar
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}")
        else:
            row.update(ok=True, compile_ms=round(1e3 * min(compiles), 2), tokens=len(times),
                       mask_us_median=round(1e6 * statistics.median(times), 1),
                       mask_us_max=round(1e6 * max(times), 1), text=text[:80])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), action="append")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    for name in args.engine or ["llguidance"]:
        rows = measure(name, args.tokens)
        for row in rows:
            print(json.dumps(row))
        ok = [r for r in rows if r["ok"]]
        print(json.dumps({"engine": name, "summary": True, "compiled": f"{len(ok)}/{len(rows)}",
                          "mask_us_median_of_medians": statistics.median(r["mask_us_median"] for r in ok) if ok else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
