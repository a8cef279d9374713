"""Each logits transform against transformers' own processors on fixed logits, and the sampler's
distribution against the softmax it should draw from."""

import numpy as np
import pytest
import torch

from neoxrt.errors import RuntimeShapeError
from neoxrt.runtime.sampling import (
    GenerationOptions,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    next_tokens,
    softmax,
)

gen_utils = pytest.importorskip("transformers.generation.logits_process")
LOGITS = np.random.default_rng(0).normal(size=(3, 40)) * 3


def _same(ours, theirs):
    theirs = theirs.numpy()
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))
    finite = ~np.isinf(ours)
    assert np.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 39])
def test_top_k_matches_transformers(k):
    _same(apply_top_k(LOGITS, k), gen_utils.TopKLogitsWarper(k)(None, torch.tensor(LOGITS)))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    _same(apply_top_p(LOGITS, p), gen_utils.TopPLogitsWarper(p)(None, torch.tensor(LOGITS)))


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_transformers(penalty):
    seen = np.array([[1, 2, 2, 7], [0, 39, 5, 5], [3, 3, 3, 3]])
    theirs = gen_utils.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(seen), torch.tensor(LOGITS))
    _same(apply_repetition_penalty(LOGITS, list(seen), penalty), theirs)


def test_temperature_sampling_draws_from_the_tempered_softmax():
    logits = np.tile(np.array([[2.0, 1.0, 0.0, -1.0, 0.5]]), (20000, 1))
    draws = next_tokens(logits, [np.array([], int)] * len(logits), GenerationOptions(temperature=0.7),
                        np.random.default_rng(1))
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert np.abs(freq - softmax(logits[:1] / 0.7)[0]).max() < 0.015


def test_top_k_and_top_p_sampling_never_leave_the_kept_set():
    logits = np.tile(LOGITS[:1], (5000, 1))
    opts = GenerationOptions(temperature=1.3, top_k=8, top_p=0.6)
    draws = next_tokens(logits, [np.array([], int)] * len(logits), opts, np.random.default_rng(2))
    kept = np.flatnonzero(~np.isinf(apply_top_p(apply_top_k(LOGITS[:1] / 1.3, 8), 0.6)[0]))
    assert set(np.unique(draws)) <= set(kept) and len(np.unique(draws)) > 1


def test_greedy_is_exact_argmax():
    seen = [np.array([], int)] * 3
    assert np.array_equal(next_tokens(LOGITS, seen, GenerationOptions(), np.random.default_rng()), LOGITS.argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                                    dict(top_p=1.01), dict(top_k=-1), dict(max_new_tokens=0), dict(repetition_penalty=0.0)])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(RuntimeShapeError):
        GenerationOptions(**kwargs)


def test_top_p_after_top_k_sorts_only_the_survivors_and_keeps_the_same_tokens():
    """The top-k survivors path of apply_top_p keeps exactly the tokens the whole-row sort keeps (ties included)."""
    from neoxrt.runtime.sampling import _top_p_rows, apply_top_k, apply_top_p

    rng = np.random.default_rng(0)
    for trial in range(60):
        vocab, rows = int(rng.integers(50, 2000)), int(rng.integers(1, 4))
        logits = rng.normal(size=(rows, vocab)) * rng.uniform(0.1, 5)
        if trial % 3 == 0:
            logits = np.round(logits, 1)  # ties
        kept = apply_top_k(logits, int(rng.integers(1, vocab // 5)))
        p = float(rng.uniform(0.05, 0.99))
        fast, whole = apply_top_p(kept, p), _top_p_rows(kept, p)
        assert np.array_equal(np.isfinite(fast), np.isfinite(whole))
        assert np.array_equal(fast[np.isfinite(fast)], whole[np.isfinite(whole)])


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.7, top_k=12),
                                    dict(temperature=0.9, top_k=30, top_p=0.8), dict(temperature=1.0, top_k=3)])
def test_the_fast_samplers_draw_the_token_the_whole_row_draw_does(kwargs):
    """next_tokens' shortcuts (block-wise inverse CDF; top-k on its survivors) pick, from the same uniforms, the
    token that draw(token_probs(...)) picks over the whole row -- with ties at the k-th value, banned (-inf) tokens,
    vocabularies that are not a multiple of the block, several rows -- and never a banned token."""
    from neoxrt.runtime.sampling import draw, token_probs

    rng = np.random.default_rng(7)
    options = GenerationOptions(**kwargs)
    for trial in range(150):
        vocab, rows = int(rng.integers(40, 3000)), int(rng.integers(1, 5))
        logits = (rng.normal(size=(rows, vocab)) * rng.uniform(0.2, 6)).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits, 1)  # ties
        if trial % 2 == 0:
            logits[rng.random(logits.shape) < rng.uniform(0.1, 0.99)] = -np.inf  # a constraint's bans
            logits[np.arange(rows), rng.integers(0, vocab, rows)] = 1.0  # every row allows something
        seen = [np.array([], int)] * rows
        seed = int(rng.integers(1 << 30))
        fast = next_tokens(logits, seen, options, np.random.default_rng(seed))
        whole = draw(token_probs(logits, seen, options), np.random.default_rng(seed))
        assert np.array_equal(fast, whole), (trial, fast, whole)
        assert np.isfinite(logits[np.arange(rows), fast]).all()


def test_the_kth_largest_from_block_maxima_is_np_partitions():
    from neoxrt.runtime.sampling import _kth_largest

    rng = np.random.default_rng(3)
    for trial in range(40):
        vocab, rows, k = int(rng.integers(5000, 60000)), int(rng.integers(1, 4)), int(rng.integers(1, 80))
        x = (rng.normal(size=(rows, vocab)) * 4).astype(np.float32)
        if trial % 2:
            x = np.round(x)  # many ties
        if trial % 3 == 0:
            x[rng.random(x.shape) < 0.999] = -np.inf  # fewer than k finite values in some rows
        assert np.array_equal(_kth_largest(x, k), np.partition(x, -k, axis=-1)[:, -k])
