"""The KV-cache pool's GroupQueryAttention form of a static-cache graph (runtime/pool_graph.py): it applies to
every fp32 static-cache variant the export takes, gives the exported graph's logits and cache through every kind
of run the pool makes (with the kernel before query_seqlens too, refusing the one run it cannot take), and does
not hold the weights twice."""

import numpy as np
import pytest

from neox_testing import VARIANTS, default_checkpoint, write_variant
from neoxrt.errors import RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator, pool_graph
from neoxrt.runtime.kv_pool import KVPool
from neoxrt.runtime.ort_session import OrtSession
from neoxrt.runtime.pool_graph import gqa_graph, takes_query_seqlens


def export(checkpoint, out, **options):
    export_checkpoint(checkpoint, out, ExportOptions(**options), log=lambda *_: None)
    return out / "model.onnx"


def runs(pool, vocab_top: int, rng, batched: bool) -> list[np.ndarray]:
    """The pool's kinds of run over three rows: a first chunk of right-padded rows, chunks after a past (one row
    each, then, where `batched`, the three rows together right-padded), decode runs over all three with the middle
    row fed a masked token once. Returns every run's logits of real tokens, then each cache tensor's written
    slots."""
    out = []
    for rid in range(3):
        pool.add(rid, 120)
    real = np.array([9, 4, 7])
    logits = pool.run([0, 1, 2], rng.integers(0, vocab_top, (3, 9)), real).copy()
    # a graph of last-position logits: only row 0's last position is real (the others' is padding, which the
    # scheduler never reads: `ragged_last` is False)
    out += [logits[j, :n] for j, n in enumerate(real)] if logits.shape[1] > 1 else [logits[0]]
    for rid, n in ((0, 5), (1, 12), (2, 1)):
        out.append(pool.run([rid], rng.integers(0, vocab_top, (1, n))).copy())
    if batched:
        real = np.array([6, 2, 4])
        logits = pool.run([0, 1, 2], rng.integers(0, vocab_top, (3, 6)), real).copy()
        out += [logits[j, :n] for j, n in enumerate(real)] if logits.shape[1] > 1 else [logits[0]]
    for step in range(3):
        logits = pool.run([0, 1, 2], rng.integers(0, vocab_top, (3, 1)), np.array([1, int(step != 1), 1])).copy()
        out += [logits[j] for j in range(3) if step != 1 or j != 1]
    out += [pool.read(t)[j, :, :end] for t in range(len(pool.names)) for j, end in enumerate(pool.ends)]
    return out


@pytest.mark.parametrize("variant", ["default", "default-last", *VARIANTS])
def test_the_pool_form_gives_the_exported_graphs_logits_and_cache(variant, tmp_path):
    """Every variant of the support table (head sizes 80 and 96 with partial rotary, full rotary, rope scaling),
    and the graph of last-position logits."""
    checkpoint = default_checkpoint() if variant.startswith("default") else write_variant(variant, tmp_path / "ckpt")
    logits = "last" if variant == "default-last" else "all"
    session = OrtSession(export(checkpoint, tmp_path / "static", kv_cache="static", logits=logits), threads=2)
    vocab = session.io_spec()[1][0].shape[-1]
    gqa = KVPool(session, 3, 3 * 128)
    assert gqa.form == "gqa" and gqa.chunk_pasts == takes_query_seqlens()
    assert session._sess is None  # the exported graph's session let go: the weights are not held twice
    exported = KVPool(session, 3, 3 * 128, pool_graph=False)
    assert exported.form == "export" and exported.chunk_pasts
    both = [runs(p, vocab, np.random.default_rng(0), gqa.chunk_pasts) for p in (gqa, exported)]
    for a, b in zip(*both, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    assert gqa.ends == exported.ends == ([23, 20, 15] if gqa.chunk_pasts else [17, 18, 11])


def test_the_older_kernel_form_gives_the_same_logits_and_refuses_what_it_cannot_take(tmp_path, monkeypatch):
    """Before ONNX Runtime 1.32 the kernel had no `query_seqlens`: the form is made without it, takes a chunk
    after a past one row at a time, and refuses several such rows in one line."""
    monkeypatch.setattr(pool_graph, "takes_query_seqlens", lambda: False)
    session = OrtSession(export(default_checkpoint(), tmp_path / "static", kv_cache="static"), threads=2)
    vocab = session.io_spec()[1][0].shape[-1]
    older = KVPool(session, 3, 3 * 128)
    assert older.form == "gqa" and not older.chunk_pasts
    exported = KVPool(session, 3, 3 * 128, pool_graph=False)
    both = [runs(p, vocab, np.random.default_rng(1), False) for p in (older, exported)]
    for a, b in zip(*both, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_a_chunk_after_a_past_over_several_rows_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_graph, "takes_query_seqlens", lambda: False)
    session = OrtSession(export(default_checkpoint(), tmp_path / "static", kv_cache="static"), threads=2)
    pool = KVPool(session, 2, 256)
    pool.add(0, 20)
    pool.add(1, 20)
    pool.run([0, 1], np.ones((2, 3), np.int64))  # first chunks: several rows are fine
    with pytest.raises(RuntimeShapeError, match="a run of several tokens after a past takes one row, got 2 rows of 3"):
        pool.run([0, 1], np.ones((2, 3), np.int64))
    pool.run([0, 1], np.ones((2, 1), np.int64))  # decode: several rows are fine
    assert pool.ends == [4, 4]


def test_the_exported_graph_is_made_again_when_something_else_runs_it(tmp_path):
    """A Generator whose session serves a pool still generates alone (left padding, which the pool form cannot
    express): its session is made again from model.onnx."""
    gen = Generator.from_artifacts(export(default_checkpoint(), tmp_path / "static", kv_cache="static").parent, threads=2)
    before = gen.generate(["Hello there", "We"], max_new_tokens=6).ids
    KVPool(gen.session, 2, 256)
    assert gen.session._sess is None
    assert gen.generate(["Hello there", "We"], max_new_tokens=6).ids == before


@pytest.mark.parametrize("options", [dict(kv_cache="static", dtype="fp16"), dict(kv_cache="dynamic")])
def test_graphs_the_form_does_not_apply_to_run_as_exported(options, tmp_path):
    path = export(default_checkpoint(), tmp_path / "m", **options)
    assert gqa_graph(path) is None
    if options.get("dtype") == "fp16":
        assert KVPool(OrtSession(path, threads=2), 2, 256).form == "export"


def test_a_decoder_made_before_the_pool_keeps_its_session(tmp_path):
    """A bound decoder made before a pool lets the exported session go keeps stepping on its own session (its
    binding belongs to it), and a second pool on the session shares the first's pool form instead of making the
    exported session again."""
    session = OrtSession(export(default_checkpoint(), tmp_path / "static", kv_cache="static"), threads=2)
    ids = np.array([[5, 17, 33, 2, 90, 41, 7]])
    steps = []
    for drop in (False, True):
        decoder = session.decoder(1, 20)
        out = [decoder.step(ids, np.ones((1, 7), np.int64), np.arange(7)[None]).copy()]
        if drop:
            first = KVPool(session, 2, 256)
            assert session._sess is None
        for t in range(3):
            token = np.array([[int(out[-1].argmax())]])
            out.append(decoder.step(token, np.ones((1, 8 + t), np.int64), np.array([[7 + t]])).copy())
        steps.append(out)
    for a, b in zip(*steps, strict=True):
        np.testing.assert_array_equal(a, b)
    second = KVPool(session, 2, 256)
    assert second.sess is first.sess and session._sess is None


def test_pools_made_at_once_share_one_pool_form(tmp_path, monkeypatch):
    """Two threads asking for the pool form at once get one session: the form is made once, not once each (the
    weights are not held twice)."""
    import threading

    session = OrtSession(export(default_checkpoint(), tmp_path / "static", kv_cache="static"), threads=2)
    made, gate = [], threading.Barrier(2)

    def counted(path):
        made.append(path)
        return gqa_graph(path)

    monkeypatch.setattr(pool_graph, "gqa_graph", counted)
    got = []

    def ask():
        gate.wait(timeout=30)
        got.append(session.pool_session())

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(got) == 2 and got[0][0] is got[1][0] and {form for _, form in got} == {"gqa"}
    assert len(made) == 1
