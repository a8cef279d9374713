"""The scheduler on a static-cache TensorRT engine, against the CPU stand-in (tests/trt_fakes.py): its KV-cache
pool lives in device buffers allocated at start (rows bound in place, repacks and prefix blocks moved by device
copies), batch and context come from the engine's profiles, and every request gets the tokens ONNX Runtime gives
it alone."""

import numpy as np
import pytest
from test_kv_pool import LONG, Collect, alone, drain, random_load_is_exact, rows_move_and_widen_intact

from neox_testing import default_checkpoint
from neoxrt import contract as io
from neoxrt.errors import RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.kv_pool import token_bytes
from neoxrt.runtime.scheduler import Scheduler, engine_limits
from neoxrt.runtime.trt_pool import DeviceKVPool
from neoxrt.runtime.trt_session import TrtSession
from trt_fakes import FakeApi, engine_artifact


@pytest.fixture(scope="module", params=["all", "last", "fp16"])
def engines(request, tmp_path_factory):
    """(ONNX Runtime generator, a factory of stand-in engine generators) of one static export: every position's
    logits, the last position's, fp16 (every position's)."""
    root = tmp_path_factory.mktemp("trt-pool")
    options = dict(logits="all", dtype="fp16") if request.param == "fp16" else dict(logits=request.param)
    export_checkpoint(default_checkpoint(), root / "onnx", ExportOptions(kv_cache="static", **options),
                      log=lambda *_: None)
    reference = Generator.from_artifacts(root / "onnx", threads=2)

    def engine(**build):
        folder, manifest = engine_artifact(root / "onnx", root / f"engine-{len(build)}-{sorted(build.items())}",
                                           **build)
        api = FakeApi(root / "onnx" / io.MODEL_FILE, manifest)
        return Generator(TrtSession(folder, manifest, api=api), manifest, reference.tokenizer), api

    return reference, engine


def test_device_pool_rows_move_and_widen_intact(engines):
    """The same moves on the device (cudaMemcpy2DAsync, a repack through the scratch buffer); a row never binds
    more slots than the engine's cache profile."""
    gen, _ = engines[1]()
    pool = DeviceKVPool(gen.session, max_rows=4, capacity_tokens=4 * 512, max_width=512)
    rows_move_and_widen_intact(pool)
    with pytest.raises(RuntimeShapeError, match="allow 512"):
        pool.set_length(1, 512)


def test_the_engine_serves_through_the_pool_with_its_alone_tokens(engines):
    """Chunked prefill (5 tokens a step), prefix reuse, greedy and seeded sampling, more requests than the engine's
    batch: every request gets what ONNX Runtime gives it alone; the scheduler takes 4 rows (the engine's profile)
    however many it was asked for; the pool's device memory is allocated by the first load and the second
    allocates nothing. An engine built with --verify-tokens 3 (every position's logits only: neoxrt build refuses
    it on --logits last) runs chunks of 2-4 tokens after a past in its verify profile."""
    reference, engine = engines
    for verify in [0, 3] if all_logits(reference) else [0]:
        serves_a_load_exactly(reference, *engine(max_batch=4, max_context=256,
                                                 **({"verify_tokens": verify} if verify else {})), verify)


def serves_a_load_exactly(reference, gen, api, verify):
    sched = Scheduler(gen, max_batch=16, prefill_tokens=5, prefix_block=4)
    assert isinstance(sched.pool, DeviceKVPool) and sched.max_batch == 4
    (long,) = reference.encode([LONG])
    load = [(long, dict(max_new_tokens=12, ignore_eos=True)),
            ("We", dict(max_new_tokens=20, ignore_eos=True)),
            (long[:20] + [300, 301], dict(max_new_tokens=9, temperature=0.8, seed=3, ignore_eos=True)),
            (long + [7], dict(max_new_tokens=6, ignore_eos=True)),
            ("The state of the Union is", dict(max_new_tokens=15, top_k=20, seed=1, ignore_eos=True)),
            (long[:9], dict(max_new_tokens=30, ignore_eos=True))]
    for round_ in range(2):
        got = Collect()
        before = len(api.memory.blocks)
        rids = [sched.submit(prompt, got, **options) for prompt, options in load]
        active = []
        for _ in range(600):
            if not (sched.stats.active or sched.stats.queued):
                break
            sched.step()
            active.append(sched.stats.active)
        assert max(active) == 4 and sched.stats.failed == 0 and not sched.pool.rows
        for rid, (prompt, options) in zip(rids, load):
            assert got.ids[rid] == alone(reference, prompt, **options), (round_, prompt)
        if round_:
            assert len(api.memory.blocks) == before  # nothing allocated per step
    assert sched.stats.prefix_hits > 0
    profiles = {profile for profile, _ in api.steps}
    assert profiles == ({"prompt", "decode", "verify"} if verify else {"prompt", "decode"})


def all_logits(generator) -> bool:
    return io.logits_rows(next(o for o in generator.session.io_spec()[1] if o.name == io.LOGITS), 2) == 2


def test_engine_profiles_bound_requests_and_the_pool(engines):
    """A request past the engine's cache profile is refused naming both numbers; the pool never binds more slots
    than the profile; a default pool holds the profile's rows of its whole context."""
    reference, engine = engines
    gen, api = engine(max_batch=2, max_context=128)
    sched = Scheduler(gen, max_batch=8, prefix_cache=False)
    assert engine_limits(gen.session) == {"batch": 2, "prompt": 128, "context": 128}
    assert sched.pool.capacity == 2 * 128 and sched.pool.max_width == 128
    with pytest.raises(RuntimeShapeError, match=r"\+ max_new_tokens \(120\) exceeds the engine's decode profile of "
                                                r"128 positions"):
        sched.submit(LONG, Collect(), max_new_tokens=120)
    got = Collect()
    rids = [sched.submit(p, got, max_new_tokens=40, ignore_eos=True) for p in (LONG, "We", "Tonight")]
    drain(sched)
    assert sched.pool.width <= 128
    assert all(shapes[io.past_key(0)][2] <= 128 for _, shapes in api.steps)
    for rid, p in zip(rids, (LONG, "We", "Tonight")):
        assert got.ids[rid] == alone(reference, p, max_new_tokens=40, ignore_eos=True)
    tensors = 2 * gen.session.num_layers  # the slots and the repack scratch (one tensor's size) share the memory
    api._cudart.free = token_bytes(gen.session) * 100  # half of it: 50 tokens' memory, less than a row of the profile
    assert Scheduler(gen, max_batch=2, prefix_cache=False).pool.capacity == 50 * tensors // (tensors + 1)


def test_random_load_on_a_small_device_pool_keeps_every_request_exact(engines):
    """A device pool of 160 slots under a random load (test_kv_pool.py's `random_load_is_exact`)."""
    reference, engine = engines
    gen, _ = engine(max_batch=4, max_context=128)
    sched = Scheduler(gen, max_batch=4, max_queue=100, prefill_tokens=7, prefix_block=4,
                      kv_cache_memory=token_bytes(gen.session) * 160 * 4 // 3)
    random_load_is_exact(sched, reference, np.random.default_rng(5), 40, 25, 20)
