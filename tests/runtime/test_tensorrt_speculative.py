"""Speculative decoding on the TensorRT runtime, through the stand-in (tests/trt_fakes.py: the "engine" is the
artifact's ONNX graph on ONNX Runtime, bound at whatever shapes and addresses the session sets): engines built
with --verify-tokens K carry a verify profile; the TensorRT decoders' step_all / truncate give the target's own
greedy tokens with every kind of guess (as tests/runtime/test_speculative.py does on ONNX Runtime), on the
dynamic and the static cache, batch 1 and 3; an engine built without --verify-tokens is refused in one line."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from neox_testing import speculative_artifacts
from neoxrt import contract as io
from neoxrt.engine_meta import VERIFY, ranges_from_manifest, select_profile
from neoxrt.errors import BuildError, RuntimeShapeError
from neoxrt.export.engine import BuildOptions, engine_profiles
from neoxrt.runtime import Generator
from neoxrt.runtime.generator import left_pad
from neoxrt.runtime.ort_session import OrtSession
from neoxrt.runtime.trt_session import TrtSession
from trt_fakes import FakeApi, engine_artifact

QUIET = dict(log=lambda *_: None)
PROMPTS = ["The state of the Union is", "Fellow citizens of the Senate and House", "We the people"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return speculative_artifacts(tmp_path_factory.mktemp("trt-spec"))


def engine(artifacts, kind, tmp_path, **options):
    """(Generator over the stand-in engine of artifact `kind`, its FakeApi)."""
    folder, manifest = engine_artifact(artifacts[kind], tmp_path / f"engine-{kind}-{len(list(tmp_path.iterdir()))}",
                                       **options)
    api = FakeApi(artifacts[kind] / io.MODEL_FILE, manifest)
    tokenizer = Tokenizer.from_file(str(artifacts[kind] / io.TOKENIZER_FILE))
    return Generator(TrtSession(folder, manifest, api=api), manifest, tokenizer), api


def test_verify_tokens_add_a_verify_profile_to_the_manifest(artifacts):
    for kind, cache_axis in (("fp32", io.PAST_SEQUENCE), ("static", io.CACHE_SEQUENCE)):
        manifest = json.loads((artifacts[kind] / io.MANIFEST_FILE).read_text())
        axes, shapes = engine_profiles(manifest, BuildOptions(max_batch=4, max_context=256, verify_tokens=4))
        assert list(axes) == ["prompt", "decode", VERIFY]
        assert axes[VERIFY][io.SEQUENCE] == [2, 5, 5] and axes[VERIFY][io.BATCH] == [1, 4, 4]
        assert axes[VERIFY][cache_axis][2] == (254 if kind == "fp32" else 256)
        if kind == "fp32":  # total = past + sequence at min, opt and max
            assert axes[VERIFY][io.TOTAL_SEQUENCE] == [3, 128 + 5, 254 + 5]
            assert shapes[VERIFY][io.past_key(0)][2][2] == 254 and shapes[VERIFY][io.ATTENTION_MASK][0] == [1, 3]
        ranges = ranges_from_manifest(axes)
        past = 10
        cache = 64 if kind == "static" else None
        assert select_profile(ranges, 2, 5, past, cache) == VERIFY
        assert select_profile(ranges, 2, 1, past, cache) == "decode"
        plain, _ = engine_profiles(manifest, BuildOptions(max_batch=4, max_context=256))
        assert VERIFY not in plain
        if kind == "static":  # no past axis: a chunk after a past that verify does not hold runs in the prompt profile
            assert select_profile(ranges, 2, 6, past, cache) == select_profile(
                ranges_from_manifest(plain), 2, 5, past, cache) == "prompt"
            continue
        with pytest.raises(RuntimeShapeError, match=r"verify supports sequence in \[2, 5\], got 6"):
            select_profile(ranges, 2, 6, past, cache)
        with pytest.raises(RuntimeShapeError, match="built with neoxrt build --verify-tokens K"):
            select_profile(ranges_from_manifest(plain), 2, 5, past, cache)
    assert BuildOptions(verify_tokens=3).to_dict()["verify_tokens"] == 3


def test_verify_tokens_refusals(artifacts):
    manifest = json.loads((artifacts["last"] / io.MANIFEST_FILE).read_text())
    with pytest.raises(BuildError, match="--verify-tokens needs every position's logits"):
        engine_profiles(manifest, BuildOptions(max_context=64, verify_tokens=2))
    manifest = json.loads((artifacts["fp32"] / io.MANIFEST_FILE).read_text())
    with pytest.raises(BuildError, match=r"--verify-tokens must be in \[1, 62\].*got 63"):
        engine_profiles(manifest, BuildOptions(max_context=64, verify_tokens=63))
    with pytest.raises(BuildError, match="--verify-tokens must be at least 0, got -1"):
        BuildOptions(verify_tokens=-1)


@pytest.mark.parametrize("kind", ["fp32", "static"])
@pytest.mark.parametrize("draft", ["int8", "wrong"])
def test_greedy_tokens_identical_with_a_draft_engine(artifacts, tmp_path, kind, draft):
    """Target and draft both TensorRT (stand-in) engines built with --verify-tokens 4."""
    ort_plain = Generator.from_artifacts(artifacts[kind])
    target, api = engine(artifacts, kind, tmp_path, verify_tokens=4)
    drafter, draft_api = engine(artifacts, draft, tmp_path, verify_tokens=4)
    target.attach_draft(drafter)
    for prompts in (PROMPTS[:1], PROMPTS):
        want = ort_plain.generate(prompts, max_new_tokens=30, ignore_eos=True).ids
        assert target.generate(prompts, max_new_tokens=30, ignore_eos=True, num_draft_tokens=4).ids == want
    stats = target.spec_stats
    rate = stats["accepted"] / stats["drafted"]
    assert (rate > 0.8) if draft == "int8" else (rate < 0.5), stats
    assert max(s[io.INPUT_IDS][1] for p, s in api.steps if p == VERIFY) == 5  # verify steps of K + 1 tokens
    catch_up = {s[io.INPUT_IDS][1] for p, s in draft_api.steps if p == VERIFY}  # after a round accepting all
    assert catch_up == {2} if draft == "int8" else catch_up <= {2}
    target.draft = None  # plain decoding on the same session afterwards (static: its CUDA graphs) is unharmed
    before = dict(api.counts)
    assert target.generate(PROMPTS, max_new_tokens=30, ignore_eos=True).ids == want
    graph_steps = sum(api.counts[k] - before[k] for k in ("replay", "capture"))  # a capture follows an execute
    assert graph_steps == (29 if kind == "static" else 0)  # every decode step after the prompt step


def test_prompt_lookup_and_rows_accepting_different_lengths_on_engines(artifacts, tmp_path):
    ort_plain = Generator.from_artifacts(artifacts["fp32"])
    target, _ = engine(artifacts, "fp32", tmp_path, verify_tokens=6)
    prompt = "one two three four five six seven eight nine ten. one two three four five six seven eight"
    want = ort_plain.generate([prompt, PROMPTS[1]], max_new_tokens=24, ignore_eos=True).ids
    got = target.generate([prompt, PROMPTS[1]], max_new_tokens=24, ignore_eos=True, prompt_lookup_tokens=6).ids
    assert got == want and target.spec_stats["accepted"] > 0
    wrong, _ = engine(artifacts, "wrong", tmp_path, verify_tokens=3)
    target.attach_draft(wrong)
    want = ort_plain.generate(PROMPTS, max_new_tokens=30, stop_token_ids=(187,))
    got = target.generate(PROMPTS, max_new_tokens=30, stop_token_ids=(187,), num_draft_tokens=3)
    assert got.ids == want.ids and got.finish_reasons == want.finish_reasons


def test_num_draft_tokens_past_the_engine_are_capped_to_its_verify_tokens(artifacts, tmp_path):
    ort_plain = Generator.from_artifacts(artifacts["static"])
    target, api = engine(artifacts, "static", tmp_path, verify_tokens=2)
    target.attach_draft(Generator.from_artifacts(artifacts["int8"]))  # an ONNX Runtime draft: any K
    want = ort_plain.generate(PROMPTS, max_new_tokens=20, ignore_eos=True).ids
    assert target.generate(PROMPTS, max_new_tokens=20, ignore_eos=True, num_draft_tokens=6).ids == want
    verify = [s[io.INPUT_IDS][1] for p, s in api.steps if p == VERIFY]
    assert verify and max(verify) == 3  # never more than K + 1 = 3 tokens after a past


@pytest.mark.parametrize("kind", ["fp32", "static"])
def test_engine_cache_rollback_equals_never_having_seen_the_tokens(artifacts, tmp_path, kind):
    """step_all of 3 guesses then truncate to keep one, against ONNX Runtime's decoder that only saw that one."""
    gen, api = engine(artifacts, kind, tmp_path, verify_tokens=4)
    ref = OrtSession(artifacts[kind] / io.MODEL_FILE)
    ids, mask, pos = left_pad([[10, 11, 12, 13, 14], [7, 8, 9]])
    a, b = gen.session.decoder(2, 16), ref.decoder(2, 16)
    np.testing.assert_allclose(a.step(ids, mask, pos), b.step(ids, mask, pos), atol=1e-4)
    guesses = np.array([[20, 21, 22], [23, 24, 25]])
    verify = a.step_all(guesses, np.concatenate([mask, np.ones((2, 3), np.int64)], 1), pos[:, -1:] + 1 + np.arange(3))
    assert verify.shape == (2, 3, int(gen.config["vocab_size"]))
    a.truncate(6)  # keep the first guess
    first = b.step(guesses[:, :1], np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1)
    np.testing.assert_allclose(verify[:, 0], first, atol=1e-4)
    step_mask = np.concatenate([mask, np.ones((2, 2), np.int64)], 1)
    got = a.step(np.array([[30], [31]]), step_mask, pos[:, -1:] + 2).copy()
    want = b.step(np.array([[30], [31]]), step_mask, pos[:, -1:] + 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.isnan(got).any()
    if kind == "fp32":
        assert api.cudart().copies_2d == 2 * gen.session.num_layers  # one strided copy per cache tensor


def test_an_engine_built_without_verify_tokens_is_refused_in_one_line(artifacts, tmp_path):
    target, _ = engine(artifacts, "fp32", tmp_path)
    with pytest.raises(RuntimeShapeError) as caught:
        target.generate(PROMPTS[:1], max_new_tokens=4, prompt_lookup_tokens=3)
    message = str(caught.value)
    assert "\n" not in message and "model engine" in message and "neoxrt build --verify-tokens K" in message
    target, _ = engine(artifacts, "fp32", tmp_path, verify_tokens=2)
    plain_draft, _ = engine(artifacts, "int8", tmp_path)
    target.attach_draft(plain_draft)
    with pytest.raises(RuntimeShapeError, match="draft engine was not built for: rebuild it with neoxrt build "
                                                "--verify-tokens K"):
        target.generate(PROMPTS[:1], max_new_tokens=4)


def test_a_generation_filling_the_static_engine_runs_speculatively(artifacts, tmp_path):
    """Prompt + new tokens = the engine's whole context: the verify steps fit in the cache a plain generation
    uses (no extra slots for guesses)."""
    target, _ = engine(artifacts, "static", tmp_path, verify_tokens=4, max_context=64)
    target.attach_draft(Generator.from_artifacts(artifacts["int8"]))
    width = len(target.encode(PROMPTS[:1])[0])
    want = Generator.from_artifacts(artifacts["static"]).generate(PROMPTS[:1], max_new_tokens=64 - width,
                                                                  ignore_eos=True).ids
    assert target.generate(PROMPTS[:1], max_new_tokens=64 - width, ignore_eos=True).ids == want
