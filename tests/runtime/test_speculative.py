"""Speculative decoding: greedy tokens identical to the target alone with every kind of guess (an INT8 draft,
a draft that is always wrong, prompt lookup), rows that accept different lengths, cache rollback, the
sampling rule's distribution, and refusals."""

import numpy as np
import pytest

from neox_testing import speculative_artifacts
from neoxrt.cli import main
from neoxrt.errors import ArtifactError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.model import NeoXConfig, random_model, save_checkpoint
from neoxrt.runtime import Generator
from neoxrt.runtime.generator import left_pad
from neoxrt.runtime.speculative import accept_sampled, lookup_draft, next_k

QUIET = dict(log=lambda *_: None)
PROMPTS = ["The state of the Union is", "Fellow citizens of the Senate and House", "We the people"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return speculative_artifacts(tmp_path_factory.mktemp("spec"))


@pytest.mark.parametrize("target", ["fp32", "static"])
@pytest.mark.parametrize("draft", ["int8", "wrong"])
def test_greedy_tokens_identical_with_a_draft(artifacts, target, draft):
    plain = Generator.from_artifacts(artifacts[target])
    spec = Generator.from_artifacts(artifacts[target], draft=artifacts[draft])
    for prompts in (PROMPTS[:1], PROMPTS):
        want = plain.generate(prompts, max_new_tokens=40, ignore_eos=True).ids
        got = spec.generate(prompts, max_new_tokens=40, ignore_eos=True, num_draft_tokens=4).ids
        assert got == want
    stats = spec.spec_stats
    rate = stats["accepted"] / stats["drafted"]
    assert (rate > 0.8) if draft == "int8" else (rate < 0.5), stats


def _stops_spinning(session) -> bool:
    options = session.sess.get_session_options()
    try:
        return options.get_session_config_entry("session.force_spinning_stop") == "1"
    except Exception:  # noqa: BLE001 -- the entry is absent: ORT's default, spinning on after a run
        return False


def test_no_session_spins_on_after_its_run(artifacts):
    """A target and its draft run by turns on the same cores, and a model alone leaves the cores to the work
    between its steps (sampling, grammar masks, the server): no session's threads spin on after a run returns."""
    spec = Generator.from_artifacts(artifacts["fp32"], draft=artifacts["int8"], threads=2)
    assert _stops_spinning(spec.session) and _stops_spinning(spec.draft.session)
    assert _stops_spinning(Generator.from_artifacts(artifacts["fp32"], threads=2).session)


def test_rows_accepting_different_lengths_stay_exact(artifacts):
    """The always-wrong draft makes rows disagree on how much they accept; stop ids end rows at different
    steps (compaction in the middle of speculative rounds)."""
    plain = Generator.from_artifacts(artifacts["fp32"])
    spec = Generator.from_artifacts(artifacts["fp32"], draft=artifacts["wrong"])
    want = plain.generate(PROMPTS, max_new_tokens=30, stop_token_ids=(187,))
    got = spec.generate(PROMPTS, max_new_tokens=30, stop_token_ids=(187,), num_draft_tokens=3)
    assert got.ids == want.ids and got.finish_reasons == want.finish_reasons


def test_prompt_lookup_identical_and_accepts_on_repetitive_text(artifacts):
    gen = Generator.from_artifacts(artifacts["fp32"])
    prompt = "one two three four five six seven eight nine ten. one two three four five six seven eight"
    want = gen.generate([prompt], max_new_tokens=24, ignore_eos=True).ids
    got = gen.generate([prompt], max_new_tokens=24, ignore_eos=True, prompt_lookup_tokens=6).ids
    assert got == want and gen.spec_stats["accepted"] > 0


def test_lookup_draft_takes_the_latest_match():
    seq = np.array([5, 6, 7, 1, 5, 6, 9, 2, 5, 6])
    assert lookup_draft(seq, 3, 2).tolist() == [9, 2, 5]  # the latest earlier "5 6" is followed by 9 2 5
    assert lookup_draft(np.array([1, 2, 3]), 3, 2).tolist() == []


@pytest.mark.parametrize("target", ["fp32", "static"])
def test_cache_rollback_equals_never_having_seen_the_tokens(artifacts, target):
    gen = Generator.from_artifacts(artifacts[target])
    ids, mask, pos = left_pad([[10, 11, 12, 13, 14]])
    a, b = gen.session.decoder(1, 16), gen.session.decoder(1, 16)
    a.step(ids, mask, pos)
    b.step(ids, mask, pos)
    a.step_all(np.array([[20, 21, 22]]), np.ones((1, 8), np.int64), np.array([[5, 6, 7]]))  # 3 guesses
    a.truncate(6)  # keep one of them
    b.step(np.array([[20]]), np.ones((1, 6), np.int64), np.array([[5]]))
    got = a.step(np.array([[30]]), np.ones((1, 7), np.int64), np.array([[6]])).copy()
    want = b.step(np.array([[30]]), np.ones((1, 7), np.int64), np.array([[6]]))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_speculative_sampling_distribution_equals_the_targets():
    """Draft q and target p over 5 tokens: the first emitted token must follow p (chi-square, 4 dof)."""
    rng = np.random.default_rng(0)
    p = np.array([0.05, 0.4, 0.3, 0.15, 0.1])
    q = np.array([0.3, 0.1, 0.2, 0.2, 0.2])
    n = 20000
    drafts = (rng.random(n)[:, None] > np.cumsum(q)[None, :]).sum(axis=1)[:, None]  # d ~ q
    pp = np.broadcast_to(p, (n, 2, 5)).copy()
    qq = np.broadcast_to(q, (n, 1, 5)).copy()
    _, tokens = accept_sampled(pp, qq, drafts, rng)
    counts = np.bincount(tokens[:, 0], minlength=5)
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum()
    assert chi2 < 18.47, (chi2, counts)  # p = 0.001 critical value; the draft's own distribution fails it
    assert (((np.bincount(drafts[:, 0], minlength=5) - n * p) ** 2) / (n * p)).sum() > 18.47


def test_sampling_with_a_draft_is_seeded(artifacts):
    spec = Generator.from_artifacts(artifacts["fp32"], draft=artifacts["int8"])
    runs = [spec.generate(PROMPTS, max_new_tokens=20, temperature=0.8, top_p=0.9, seed=5).ids for _ in range(2)]
    assert runs[0] == runs[1]


def test_refusals(artifacts, tmp_path, capsys):
    config = NeoXConfig(vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96)
    ckpt = save_checkpoint(random_model(config), tmp_path / "small")
    export_checkpoint(ckpt, tmp_path / "small-art", ExportOptions(), **QUIET)
    with pytest.raises(ArtifactError, match="draft vocabulary has 128 tokens"):
        Generator.from_artifacts(artifacts["fp32"], draft=tmp_path / "small-art")
    assert main(["generate", str(artifacts["fp32"]), "--prompt", "x", "--draft", str(tmp_path / "small-art")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "draft vocabulary" in err
    with pytest.raises(ArtifactError, match="--logits all"):
        Generator.from_artifacts(artifacts["last"], draft=artifacts["int8"])
    assert main(["generate", str(artifacts["fp32"]), "--prompt", "x", "--prompt-lookup-tokens", "-1"]) == 2
    assert "argument --prompt-lookup-tokens: expected an integer in [0, 2**31), got -1" in capsys.readouterr().err


def test_k_grows_after_full_acceptance_and_falls_toward_what_was_accepted():
    assert next_k(4, 4, 4, 12) == 6 and next_k(11, 11, 11, 12) == 12 and next_k(12, 12, 12, 12) == 12
    assert next_k(12, 0, 12, 12) == 6 and next_k(12, 10, 12, 12) == 11 and next_k(6, 5, 6, 12) == 5
    assert next_k(1, 0, 1, 12) == 1 and next_k(2, 0, 2, 12) == 1
    k, ks = 12, []
    for _ in range(6):  # a draft that is always wrong: down to one guess a round within a few rounds
        k = next_k(k, 0, k, 12)
        ks.append(k)
    assert ks == [6, 3, 2, 1, 1, 1]
