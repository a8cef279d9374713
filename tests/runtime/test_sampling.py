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
