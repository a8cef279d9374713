"""neoxrt generate (ONNX Runtime) against transformers generate(), token for token; streaming, stopping,
batch compaction, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from neox_testing import default_checkpoint, left_pad, write_variant
from neoxrt.cli import main
from neoxrt.errors import RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.session import FeedDecoder

transformers = pytest.importorskip("transformers")
QUIET = dict(log=lambda *_: None)
TEXT_PROMPTS = ["The state of the Union is", "Gentlemen of the Senate and House of Representatives: it is", "We"]
ID_PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 3], [64, 65, 66, 67]]


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "default"
    export_checkpoint(default_checkpoint(), out, ExportOptions(attention="decomposed"), **QUIET)
    return out


def hf_greedy(folder, prompts, new_tokens):
    """transformers generate() new tokens per row, cut after the first EOS as a row that stopped."""
    model = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask, _ = left_pad(prompts, pad_id=model.config.eos_token_id or 0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=model.config.eos_token_id or 0)[:, ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def test_cli_greedy_equals_transformers_on_trained_model(default_artifact, capsys):
    tok = Generator.from_artifacts(default_artifact).tokenizer
    prompts = [tok.encode(p).ids for p in TEXT_PROMPTS]
    args = ["generate", str(default_artifact), "--max-new-tokens", "64", "--json"]
    for p in TEXT_PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ids"] == hf_greedy(default_checkpoint(), prompts, 64)
    assert got["text"][0] == tok.decode(got["ids"][0])


@pytest.mark.parametrize("name", ["gelu_parallel", "sequential_residual", "head_dim_96_rotary_24", "tied_embeddings",
                                  "linear_rope_scaling", "no_attention_bias"])
def test_greedy_equals_transformers_on_random_configs(name, tmp_path):
    ckpt = write_variant(name, tmp_path / "ckpt", seed=3)
    export_checkpoint(ckpt, tmp_path / "art", ExportOptions(attention="decomposed"), **QUIET)
    got = Generator.from_artifacts(tmp_path / "art").generate(ID_PROMPTS, max_new_tokens=64).ids
    assert got == hf_greedy(ckpt, ID_PROMPTS, 64)


def test_fused_artifact_generates_the_same_tokens(tmp_path, default_artifact):
    export_checkpoint(default_checkpoint(), tmp_path / "fused", ExportOptions(attention="fused"), **QUIET)
    a = Generator.from_artifacts(default_artifact).generate(TEXT_PROMPTS, max_new_tokens=32).ids
    b = Generator.from_artifacts(tmp_path / "fused").generate(TEXT_PROMPTS, max_new_tokens=32).ids
    assert a == b


def test_bound_decoder_equals_portable_decoder(default_artifact):
    gen = Generator.from_artifacts(default_artifact)
    bound = gen.generate(ID_PROMPTS, max_new_tokens=24, temperature=0.7, seed=5).ids

    class Portable:
        def __init__(self, inner):
            self.inner, self.num_layers = inner, inner.num_layers

        def io_spec(self):
            return self.inner.io_spec()

        def run(self, feeds):
            return self.inner.run(feeds)

        def decoder(self, batch, max_total):
            return FeedDecoder(self, batch)

    gen.session = Portable(gen.session)
    assert gen.generate(ID_PROMPTS, max_new_tokens=24, temperature=0.7, seed=5).ids == bound


def test_bound_decoder_logits_equal_portable_step_by_step(default_artifact):
    """The I/O-bound decoder (buffers bound by pointer, nothing rebound that did not change) gives each step's
    logits as the portable decoder does, through a prompt step, decode steps, a compaction and a multi-token step."""
    import numpy as np

    from neoxrt.runtime.generator import left_pad as runtime_left_pad

    gen = Generator.from_artifacts(default_artifact)
    ids, mask, pos = runtime_left_pad(ID_PROMPTS, 0)
    bound, portable = gen.session.decoder(len(ID_PROMPTS), ids.shape[1] + 16), FeedDecoder(gen.session, len(ID_PROMPTS))
    feed, worst = (ids, mask, pos), 0.0
    for step in range(10):
        a, b = bound.step_all(*feed).copy(), portable.step_all(*feed)
        worst = max(worst, float(np.abs(a - b).max()))
        nxt = b[:, -1].argmax(-1)[:, None]
        mask, pos = np.concatenate([mask, np.ones((len(mask), 1 + (step == 6)), np.int64)], axis=1), feed[2][:, -1:] + 1
        if step == 4:  # a row leaves the batch
            bound.keep_rows(np.array([0, 2]))
            portable.keep_rows(np.array([0, 2]))
            nxt, mask, pos = nxt[[0, 2]], mask[[0, 2]], pos[[0, 2]]
        if step == 6:  # two tokens at once (the speculative verify shape)
            nxt, pos = np.concatenate([nxt, nxt], axis=1), np.concatenate([pos, pos + 1], axis=1)
        feed = (nxt.astype(np.int64), mask, pos)
    assert worst <= 1e-5


def test_rows_stop_on_their_own_and_compaction_keeps_the_rest_exact(default_artifact):
    gen = Generator.from_artifacts(default_artifact)
    alone = [gen.generate([p], max_new_tokens=20).ids[0] for p in TEXT_PROMPTS]
    stop = alone[1][4]  # row 1 stops at its 5th token
    got = gen.generate(TEXT_PROMPTS, max_new_tokens=20, stop_token_ids=(stop,))
    first = alone[1].index(stop)
    assert got.ids[1] == alone[1][: first + 1] and got.finish_reasons[1] == "stop_token"
    for row in (0, 2):
        expected = alone[row][: alone[row].index(stop) + 1] if stop in alone[row] else alone[row]
        assert got.ids[row] == expected


def test_stop_strings_and_streaming(default_artifact):
    gen = Generator.from_artifacts(default_artifact)
    full = gen.generate("The state of the Union is", max_new_tokens=30)
    pieces = [e.text for e in gen.stream("The state of the Union is", max_new_tokens=30)]
    assert "".join(pieces) == full.text[0]
    cut = gen.generate("The state of the Union is", max_new_tokens=30, stop_strings=("world",))
    assert cut.finish_reasons == ["stop_string"] and "world" not in cut.text[0]
    assert full.text[0].startswith(cut.text[0]) and len(cut.ids[0]) < 30


def test_streamed_pieces_never_show_a_stop_string_that_spans_tokens(default_artifact):
    """A stop string that spans tokens: the stream holds back a tail that may start it, so the pieces join to the
    non-streamed text (what comes before the stop string, nothing of it); a held tail that turns out not to be a
    stop string goes out with a later piece, or at the end when the row stops otherwise."""
    gen = Generator.from_artifacts(default_artifact)
    prompt = "The state of the Union is"
    full = gen.generate(prompt, max_new_tokens=30)
    ids, text = full.ids[0], full.text[0]
    ends = [len(gen.tokenizer.decode(ids[:k])) for k in range(1, len(ids))]  # where tokens end in the text
    cases = [text[e - 2:e + 3] for e in ends[3:12] if text[e - 2:e + 3].strip()]  # each spans a token boundary
    cases += [text[-3:] + "never", text[4:7] + "\u2603"]  # a prefix seen at the end; a start that never completes
    for stop in cases:
        pieces = [e.text for e in gen.stream(prompt, max_new_tokens=30, stop_strings=(stop,))]
        want = gen.generate(prompt, max_new_tokens=30, stop_strings=(stop,))
        assert "".join(pieces) == want.text[0], stop
        if stop in text:
            assert want.finish_reasons == ["stop_string"] and want.text[0] == text[:text.index(stop)]
        else:
            assert want.text[0] == text


def test_streamed_text_at_the_end_of_a_row_is_the_non_streamed_text(default_artifact):
    """A stop token whose text completes a stop string sends nothing of the stop string; a row that ends (length)
    in the middle of a character still sends what the non-streamed text decodes (its replacement character)."""
    from neoxrt.runtime.generator import RowBook
    from neoxrt.runtime.sampling import GenerationOptions

    gen = Generator.from_artifacts(default_artifact)
    prompt = "The state of the Union is"
    ids = gen.generate(prompt, max_new_tokens=20).ids[0]
    for k in range(3, 12):
        before = gen.tokenizer.decode(ids[:k])
        stop = before[-3:] + gen.tokenizer.decode(ids[:k + 1])[len(before):][:1]
        options = dict(max_new_tokens=20, stop_strings=(stop,), stop_token_ids=(ids[k],))
        events = list(gen.stream(prompt, **options))
        assert "".join(e.text for e in events) == gen.generate(prompt, **options).text[0], stop
    tokens = gen.tokenizer.encode("ab \U0001F600").ids  # the emoji's bytes over more than one token
    for cut in range(1, len(tokens) + 1):
        for stops in ((), ("zz",)):
            options = GenerationOptions(max_new_tokens=cut, stop_strings=stops)
            book = RowBook(gen, [[5]], options)
            pieces = "".join(book.emit(0, t).text for t in tokens[:cut])
            assert pieces == gen.tokenizer.decode(tokens[:cut]), (cut, stops)


def test_beam_search_refuses_stop_strings(default_artifact):
    with pytest.raises(RuntimeShapeError, match="stop_strings end greedy and sampled generation, not beam search"):
        Generator.from_artifacts(default_artifact).generate("We", num_beams=2, max_new_tokens=4, stop_strings=("a",))


def test_sampling_is_seeded_and_reproducible(default_artifact):
    gen = Generator.from_artifacts(default_artifact)
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2)
    a = gen.generate(TEXT_PROMPTS, seed=11, **kw).ids
    assert gen.generate(TEXT_PROMPTS, seed=11, **kw).ids == a
    assert gen.generate(TEXT_PROMPTS, seed=12, **kw).ids != a


def test_runtime_imports_neither_torch_nor_transformers(default_artifact):
    code = (
        "import sys; from neoxrt.runtime import Generator; "
        f"g = Generator.from_artifacts({str(default_artifact)!r}); g.generate('Hello', max_new_tokens=3); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _tamper(folder, edit):
    import shutil

    out = folder.parent / f"{folder.name}-{edit.__name__}"
    shutil.copytree(folder, out)
    edit(out)
    return out


def test_bad_input_is_one_line_exit_2(default_artifact, tmp_path, capsys):
    def onnx_changed(f):
        data = bytearray((f / "model.onnx").read_bytes())
        data[-100] ^= 0xFF
        (f / "model.onnx").write_bytes(bytes(data))

    def other_version(f):
        m = json.loads((f / "manifest.json").read_text())
        (f / "manifest.json").write_text(json.dumps({**m, "toolkit_version": "0.0.1"}))

    def no_tokenizer(f):
        (f / "tokenizer.json").unlink()
        m = json.loads((f / "manifest.json").read_text())
        del m["files"]["tokenizer.json"]
        (f / "manifest.json").write_text(json.dumps(m))

    def bad_session_config(f):
        m = json.loads((f / "manifest.json").read_text())
        (f / "manifest.json").write_text(json.dumps({**m, "onnxruntime_session_config": {"session.x": 1}}))

    art = str(default_artifact)
    cases = {
        "empty prompt": ([art, "--prompt", ""], "empty prompt"),
        "past context": ([art, "--prompt", "Hi", "--max-new-tokens", "2048"], "exceeds the model's context of 2048"),
        "negative temperature": ([art, "--prompt", "Hi", "--temperature", "-1"], "--temperature: expected a number >= 0"),
        "nan temperature": ([art, "--prompt", "Hi", "--temperature", "nan"], "argument --temperature: expected a finite number"),
        "top_p 0": ([art, "--prompt", "Hi", "--top-p", "0"], "argument --top-p: expected a number in (0, 1]"),
        "top_p > 1": ([art, "--prompt", "Hi", "--top-p", "1.5"], "argument --top-p: expected a number in (0, 1]"),
        "onnx mismatch": ([str(_tamper(default_artifact, onnx_changed)), "--prompt", "Hi"], "does not match its manifest"),
        "toolkit mismatch": ([str(_tamper(default_artifact, other_version)), "--prompt", "Hi"], "made by neoxrt 0.0.1"),
        "missing tokenizer": ([str(_tamper(default_artifact, no_tokenizer)), "--prompt", "Hi"], "no tokenizer.json"),
        "session config": ([str(_tamper(default_artifact, bad_session_config)), "--prompt", "Hi"],
                           "onnxruntime_session_config must map strings to strings"),
        "missing folder": ([str(tmp_path / "nothing"), "--prompt", "Hi"], "does not exist"),
    }
    for name, (args, fragment) in cases.items():
        assert main(["generate", *args]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, (name, err)
    # token ids still work without a tokenizer
    assert main(["generate", str(default_artifact) + "-no_tokenizer", "--input-ids", "5,6,7", "--json",
                 "--max-new-tokens", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"][0]) == 3



def test_text_is_decoded_piecewise_as_whole(default_artifact):
    """Streamed pieces, decoded incrementally (only the tokens after the last whole character), join to the
    full decode at every step, hold back incomplete characters, and equal the decode-everything path."""
    from neoxrt.runtime.generator import TextSoFar
    from neoxrt.runtime.sampling import GenerationOptions

    gen = Generator.from_artifacts(default_artifact)
    assert gen._byte_level
    text = "naïve café — 東京タワー 😀🎉 ok\nZürich ½"
    ids = gen.tokenizer.encode(text).ids
    options = GenerationOptions()
    state, pieces, held = TextSoFar(), [], 0
    for n in range(1, len(ids) + 1):
        piece, reason = gen._piece(0, ids[:n], [state], options)
        assert reason is None
        pieces.append(piece)
        held += piece == ""
        full = gen.tokenizer.decode(ids[:n])
        assert full.startswith("".join(pieces)) and ("".join(pieces) == full or full.endswith("\ufffd"))
    assert "".join(pieces) == text and held > 0  # the emoji's bytes span tokens: pieces were held back
    plain = type(gen).__dict__["_byte_level"]
    try:  # the same through the decode-everything path
        type(gen)._byte_level = property(lambda self: False)
        state, again = TextSoFar(), []
        for n in range(1, len(ids) + 1):
            again.append(gen._piece(0, ids[:n], [state], options)[0])
    finally:
        type(gen)._byte_level = plain
    assert again == pieces
