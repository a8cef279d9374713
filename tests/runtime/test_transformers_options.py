"""transformers' generate() options by their names: greedy parity with transformers on the same fp32 checkpoint
for no_repeat_ngram_size, min_new_tokens, bad_words_ids, repetition_penalty and do_sample=False (alone and
with beams); typical_p as transformers' warper; contradictory options refused by name."""

import numpy as np
import pytest
import torch

from neox_testing import default_checkpoint
from neoxrt.errors import RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.sampling import GenerationOptions, apply_typical_p

transformers = pytest.importorskip("transformers")
PROMPT = "The state of the Union is"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("opts") / "art"
    export_checkpoint(default_checkpoint(), out, ExportOptions(), log=lambda *_: None)
    return Generator.from_artifacts(out), transformers.GPTNeoXForCausalLM.from_pretrained(default_checkpoint()).eval()


def _hf(model, ids, new_tokens, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def _words(gen, *texts):
    return tuple(tuple(gen.tokenizer.encode(t).ids) for t in texts)


@pytest.mark.parametrize("name", ["no_repeat_ngram_size", "min_new_tokens", "bad_words_ids", "repetition_penalty",
                                  "beams_no_repeat"])
def test_greedy_options_equal_transformers(pair, name):
    gen, hf = pair
    ids = gen.encode([PROMPT])[0]
    dot = gen.tokenizer.encode(".").ids[0]
    kw = {"no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
          "min_new_tokens": dict(min_new_tokens=12),
          "bad_words_ids": dict(bad_words_ids=_words(gen, " the", " people of")),
          "repetition_penalty": dict(repetition_penalty=1.4),
          "beams_no_repeat": dict(num_beams=3, no_repeat_ngram_size=3)}[name]
    hf_kw = {k: [list(w) for w in v] if k == "bad_words_ids" else v for k, v in kw.items()}
    ours = gen.generate([ids], max_new_tokens=24, do_sample=False, stop_token_ids=(dot,), **kw).ids[0]
    theirs = _hf(hf, ids, 24, do_sample=False, eos_token_id=[0, dot], **hf_kw)
    assert ours == theirs[:len(ours)] and all(t == 0 for t in theirs[len(ours):]), (ours, theirs)
    plain = gen.generate([ids], max_new_tokens=24, do_sample=False, stop_token_ids=(dot,)).ids[0]
    assert ours != plain  # the option changed something here


@pytest.mark.parametrize("eos", ["int", "list"])
def test_eos_and_pad_token_id_kwargs_equal_transformers(pair, eos):
    """The same keywords passed to both: eos_token_id replaces the model's EOS (an int or a list)."""
    gen, hf = pair
    ids = gen.encode([PROMPT])[0]
    dot = gen.tokenizer.encode(".").ids[0]
    kw = dict(eos_token_id=dot if eos == "int" else [dot, 10**4 + 7])
    ours = gen.generate([ids], max_new_tokens=24, do_sample=False, pad_token_id=0, **kw)
    theirs = _hf(hf, ids, 24, do_sample=False, **kw)
    assert ours.ids[0] == theirs[:len(ours.ids[0])] and dot in ours.ids[0], (ours.ids[0], theirs)
    assert ours.finish_reasons == ["stop_token"]


def test_typical_p_equals_transformers_warper():
    from transformers.generation.logits_process import TypicalLogitsWarper

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)) * 3
    want = TypicalLogitsWarper(0.7)(None, torch.tensor(logits)).numpy()
    got = apply_typical_p(logits.copy(), 0.7)
    assert np.array_equal(np.isinf(got), np.isinf(want))


def test_do_sample_rules():
    assert GenerationOptions(do_sample=False, temperature=0.7).greedy
    assert not GenerationOptions(do_sample=True).greedy and GenerationOptions(do_sample=True).temperature == 1.0
    assert GenerationOptions().greedy
    for kw, fragment in ((dict(do_sample=True, temperature=0.0), "do_sample=True needs temperature > 0"),
                         (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
                         (dict(typical_p=1.5), "typical_p must be in (0, 1]"),
                         (dict(bad_words_ids=[[]]), "bad_words_ids must not contain an empty list"),
                         (dict(top_p=1.5), "top_p must be in (0, 1]")):
        with pytest.raises(RuntimeShapeError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            GenerationOptions(**kw)


def test_logprobs_equal_transformers(pair):
    gen, hf = pair
    ids = gen.encode([PROMPT])[0]
    result = gen.generate([ids], max_new_tokens=8, logprobs=3, ignore_eos=True)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    for step, entry in enumerate(result.logprobs[0]):
        want = torch.log_softmax(out.logits[step][0].double(), -1)
        assert abs(entry["logprob"] - float(want[entry["token"]])) < 1e-4
        assert [t for t, _ in entry["top"]] == torch.topk(want, 3).indices.tolist()
        assert entry["token"] == entry["top"][0][0]  # greedy: the chosen token is the most likely


def test_prompt_logprobs_equal_pytorch(pair):
    from neoxrt.model import load_model

    gen, _ = pair
    rows = gen.encode([PROMPT, "We the people"])
    got = gen.prompt_logprobs(rows)
    model = load_model(default_checkpoint())
    for row, scores in zip(rows, got):
        with torch.no_grad():
            logits, _ = model(torch.tensor([row]), torch.arange(len(row))[None], torch.ones(1, len(row), dtype=torch.long),
                              model.empty_past(1))
        want = torch.log_softmax(logits[0].double(), -1)
        assert scores[0] is None
        assert max(abs(s - float(want[t, tok])) for t, (s, tok) in enumerate(zip(scores[1:], row[1:]))) < 1e-4
