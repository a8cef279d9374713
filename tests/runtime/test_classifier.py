"""`neoxrt.runtime.Classifier` and `neoxrt classify` / `neoxrt answer` on head artifacts made from transformers
models with the embedded tokenizer: results equal transformers' (logits <= 1e-4, same labels and spans),
batching and windows do not change them, JSON carries full-precision floats, bad input is one line, exit 2."""

import json

import numpy as np
import pytest
import torch

from neox_testing import HEAD_QUESTION as QUESTION
from neox_testing import HEAD_TEXTS as TEXTS
from neox_testing import TEXT_CONFIG, export_heads, write_variant
from neoxrt import contract as io
from neoxrt.cli import main
from neoxrt.errors import ArtifactError, RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Classifier
from neoxrt.runtime.classifier import MAX_ANSWER_LEN

ATOL = 1e-4
CONTEXT = "Barack Obama went to Paris in 2009, then to Berlin."


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    out = export_heads(root, ("text-classification", "token-classification", "question-answering"))
    write_variant("gelu_parallel", root / "lm")
    export_checkpoint(root / "lm", root / "lm-art", ExportOptions(), log=lambda *_: None)
    out["text-generation"] = (root / "lm-art", None)
    return out


def _tokenizer(art):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(art / io.TOKENIZER_FILE))


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_classify_matches_transformers_in_any_batching(artifacts):
    art, model = artifacts["text-classification"]
    tok = _tokenizer(art)
    one = Classifier.from_artifacts(art, batch_size=1).classify(TEXTS)
    results = Classifier.from_artifacts(art, batch_size=2).classify(TEXTS)  # mixed lengths share a padded batch
    for text, got, alone in zip(TEXTS, results, one):
        with torch.no_grad():
            logits = model(torch.tensor([tok.encode(text).ids])).logits[0].double().numpy()
        assert np.abs(np.array(got.logits) - logits).max() <= ATOL
        assert np.abs(np.array(got.logits) - np.array(alone.logits)).max() <= 1e-5
        probs = _softmax(logits)
        assert got.label == model.config.id2label[int(probs.argmax())]
        assert got.score == max(got.scores.values()) and abs(sum(got.scores.values()) - 1) < 1e-9
        assert all(abs(got.scores[model.config.id2label[i]] - p) <= ATOL for i, p in enumerate(probs))


def test_tag_matches_transformers_with_offsets(artifacts):
    art, model = artifacts["token-classification"]
    tok = _tokenizer(art)
    for text, tags in zip(TEXTS, Classifier.from_artifacts(art).tag(TEXTS)):
        enc = tok.encode(text)
        with torch.no_grad():
            probs = _softmax(model(torch.tensor([enc.ids])).logits[0].double().numpy())
        assert [(t.start, t.end) for t in tags] == [tuple(o) for o in enc.offsets]
        assert all(t.token == text[t.start:t.end] for t in tags)
        assert [t.label for t in tags] == [model.config.id2label[int(k)] for k in probs.argmax(-1)]
        assert np.abs(np.array([t.score for t in tags]) - probs.max(-1)).max() <= ATOL


def test_answer_matches_transformers_best_span(artifacts):
    """Encoded as transformers' tokenizer(question, context); best start + end logit, start <= end < start + 15."""
    from transformers import PreTrainedTokenizerFast

    art, model = artifacts["question-answering"]
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(art / io.TOKENIZER_FILE))
    encoded = hf_tok(QUESTION, CONTEXT, return_offsets_mapping=True)
    ids, seq = encoded["input_ids"], encoded.sequence_ids()
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    ctx = [t for t, s in enumerate(seq) if s == 1]
    start, end = out.start_logits[0, ctx].double().numpy(), out.end_logits[0, ctx].double().numpy()
    best = max(((i, j) for i in range(len(ctx)) for j in range(i, min(len(ctx), i + MAX_ANSWER_LEN))),
               key=lambda p: start[p[0]] + end[p[1]])
    got = Classifier.from_artifacts(art).answer(QUESTION, CONTEXT)
    chars = (encoded["offset_mapping"][ctx[best[0]]][0], encoded["offset_mapping"][ctx[best[1]]][1])
    assert (got.start, got.end) == chars and got.answer == CONTEXT[chars[0]:chars[1]]
    assert abs(got.score - _softmax(start)[best[0]] * _softmax(end)[best[1]]) <= ATOL


def test_long_context_is_windowed_with_stride(artifacts, monkeypatch):
    art, _ = artifacts["question-answering"]
    classifier = Classifier.from_artifacts(art)
    context = " ".join([CONTEXT] * 12)  # ~150 tokens, the model holds 64
    rows = []
    run_rows = classifier.run_rows
    monkeypatch.setattr(classifier, "run_rows", lambda r: rows.extend(r) or run_rows(r))
    got = classifier.answer(QUESTION, context, stride=16)
    q = len(_tokenizer(art).encode(QUESTION).ids)
    assert len(rows) > 2 and all(len(r) <= TEXT_CONFIG.max_position_embeddings for r in rows)
    assert all(a[-16:] == b[q:q + 16] for a, b in zip(rows, rows[1:]))  # neighbours share 16 context tokens
    ctx_ids = _tokenizer(art).encode(context).ids
    covered = [t for r in rows for t in r[q:]]
    assert len(covered) - 16 * (len(rows) - 1) == len(ctx_ids)  # every context token in a window
    assert got.answer == context[got.start:got.end] and got.answer and 0 < got.score <= 1


def test_cli_json(artifacts, capsys):
    art, _ = artifacts["text-classification"]
    assert main(["classify", str(art), "--text", TEXTS[0], "--text", TEXTS[1], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    api = Classifier.from_artifacts(art).classify(TEXTS[:2])
    assert [set(r) for r in rows] == [{"label", "score", "scores"}] * 2
    assert [(r["label"], r["score"], r["scores"]) for r in rows] == [(a.label, a.score, a.scores) for a in api]  # exact
    art, _ = artifacts["token-classification"]
    assert main(["classify", str(art), "--text", TEXTS[1], "--json"]) == 0
    tags = json.loads(capsys.readouterr().out)
    assert tags == [[t.to_dict() for t in Classifier.from_artifacts(art).tag(TEXTS[1])[0]]]
    assert set(tags[0][0]) == {"token", "start", "end", "label", "score"}
    art, _ = artifacts["question-answering"]
    assert main(["answer", str(art), "--question", QUESTION, "--context", CONTEXT, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == Classifier.from_artifacts(art).answer(QUESTION, CONTEXT).to_dict()
    assert CONTEXT[answer["start"]:answer["end"]] == answer["answer"]


def _one_line_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_inputs_one_line_exit_2(artifacts, capsys):
    cls, qa, tok = (str(artifacts[t][0]) for t in ("text-classification", "question-answering", "token-classification"))
    lm = str(artifacts["text-generation"][0])
    _one_line_error(["classify", cls, "--text", ""], capsys, "text 1 of 1 is empty")
    _one_line_error(["classify", tok, "--text", "fine", "--text", "   "], capsys, "text 2 of 2 is empty")
    _one_line_error(["classify", cls], capsys, "give --text")
    _one_line_error(["answer", qa, "--question", "", "--context", CONTEXT], capsys, "empty question")
    _one_line_error(["answer", qa, "--question", QUESTION, "--context", ""], capsys, "empty context")
    _one_line_error(["classify", qa, "--text", "hi"], capsys, "is a question-answering export")
    _one_line_error(["answer", cls, "--question", QUESTION, "--context", CONTEXT], capsys, "is a text-classification export")
    _one_line_error(["classify", lm, "--text", "hi"], capsys, "is a text-generation export")
    _one_line_error(["generate", qa, "--prompt", "hi"], capsys, "is a question-answering export")
    _one_line_error(["calibrate", cls, str(artifacts["text-classification"][0].parent / "int4"), "--weights-only",
                     "--bits", "4"], capsys, "INT4 is for text-generation exports")
    with pytest.raises(RuntimeShapeError, match="has 100 tokens; the model holds 64"):
        Classifier.from_artifacts(cls).classify(" a" * 100)
    with pytest.raises(ArtifactError, match="tag needs a token-classification artifact"):
        Classifier.from_artifacts(cls).tag("hi")


def test_classifier_imports_neither_torch_nor_transformers(artifacts):
    import subprocess
    import sys

    art = str(artifacts["question-answering"][0])
    code = ("import sys; from neoxrt.runtime import Classifier; "
            f"Classifier.from_artifacts({art!r}).answer({QUESTION!r}, {CONTEXT!r}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
