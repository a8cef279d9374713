"""Beam search: the same sequences as transformers' generate(num_beams=...) on the same fp32 checkpoint, with
length penalty, every early_stopping mode, several stop tokens and num_return_sequences; bad options refused."""

import pytest
import torch

from neox_testing import default_checkpoint, write_variant
from neoxrt.cli import main
from neoxrt.errors import RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.generator import left_pad

transformers = pytest.importorskip("transformers")
QUIET = dict(log=lambda *_: None)
PROMPTS = ["The state of the Union is", "We the people"]
CASES = [dict(num_beams=2), dict(num_beams=4, length_penalty=0.6, early_stopping=True),
         dict(num_beams=4, early_stopping="never", length_penalty=1.5, num_return_sequences=3),
         dict(num_beams=3, length_penalty=-0.5), dict(num_beams=5, num_return_sequences=5),
         dict(num_beams=3, repetition_penalty=1.3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("beam") / "art"
    export_checkpoint(default_checkpoint(), out, ExportOptions(), **QUIET)
    return Generator.from_artifacts(out), transformers.GPTNeoXForCausalLM.from_pretrained(default_checkpoint()).eval()


def _hf(model, rows, new_tokens, eos, **kw):
    ids, mask, _ = left_pad(rows, 0)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=eos, **kw)
    return out[:, ids.shape[1]:].tolist()


def _same(ours, theirs, fill=0):
    """Ours are cut at their own length; transformers pads shorter sequences with the fill value."""
    return len(ours) == len(theirs) and all(o == t[:len(o)] and all(x == fill for x in t[len(o):])
                                            for o, t in zip(ours, theirs))


@pytest.mark.parametrize("kw", CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_beam_search_equals_transformers(trained, kw):
    gen, hf = trained
    rows = gen.encode(PROMPTS)
    stops = tuple(gen.tokenizer.encode(t).ids[0] for t in (".", ","))
    ours = gen.generate(rows, max_new_tokens=24, stop_token_ids=stops, **kw).ids
    assert _same(ours, _hf(hf, rows, 24, [0, *stops], **kw)), ours
    assert any(len(o) < 24 for o in ours) or kw.get("early_stopping") == "never"  # stop tokens were met


def test_beam_search_on_a_random_config(tmp_path):
    ckpt = write_variant("sequential_residual", tmp_path / "ckpt", seed=3)
    export_checkpoint(ckpt, tmp_path / "art", ExportOptions(attention="decomposed"), **QUIET)
    gen = Generator.from_artifacts(tmp_path / "art")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(ckpt).eval()
    rows = [[5, 17, 33, 2, 90], [12, 3]]
    for kw in (dict(num_beams=3), dict(num_beams=2, length_penalty=2.0, num_return_sequences=2)):
        assert _same(gen.generate(rows, max_new_tokens=16, **kw).ids, _hf(hf, rows, 16, [0], **kw))


def test_bad_beam_options(trained, capsys):
    gen, _ = trained
    for kw, fragment in ((dict(num_beams=0), "num_beams must be an integer >= 1"),
                         (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be in [1, num_beams=2]"),
                         (dict(num_return_sequences=3), "needs sampling (temperature > 0) or num_beams > 1"),
                         (dict(num_beams=2, early_stopping="soon"), "early_stopping must be True, False or 'never'")):
        with pytest.raises(RuntimeShapeError) as info:
            gen.generate(PROMPTS, max_new_tokens=4, **kw)
        assert fragment in str(info.value)
    samples = gen.generate(PROMPTS[:1], max_new_tokens=6, temperature=1.0, seed=0, num_return_sequences=3).ids
    assert len(samples) == 3


def test_cli_beams(trained, tmp_path, capsys):
    export_checkpoint(default_checkpoint(), tmp_path / "art", ExportOptions(), **QUIET)
    assert main(["generate", str(tmp_path / "art"), "--prompt", PROMPTS[0], "--num-beams", "3",
                 "--num-return-sequences", "2", "--max-new-tokens", "8", "--json"]) == 0
    assert '"ids":[[' in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "art"), "--prompt", "x", "--num-beams", "0"]) == 2
    assert "argument --num-beams: expected an integer in [1, 2**31), got 0" in capsys.readouterr().err
