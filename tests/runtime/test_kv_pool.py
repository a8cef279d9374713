"""The scheduler's KV-cache pool (static-cache exports): rows written in place at their own slots, chunked
prefill under a token budget, prefix reuse, admission by memory, and failures that stay with their request --
every request still gets the tokens it gets alone."""

import numpy as np
import pytest

from neox_testing import default_checkpoint
from neoxrt.errors import RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.kv_pool import KVPool, token_bytes
from neoxrt.runtime.scheduler import Scheduler

LONG = ("Gentlemen of the Senate and House of Representatives: it is my duty to report on the state of the Union, "
        "and I do so with great confidence in our future")


@pytest.fixture(scope="module", params=["all", "last"])
def generator(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool") / request.param
    export_checkpoint(default_checkpoint(), out, ExportOptions(kv_cache="static", logits=request.param),
                      log=lambda *_: None)
    return Generator.from_artifacts(out, threads=2)


class Collect:
    def __init__(self):
        self.ids, self.reason, self.steps = {}, {}, {}

    def __call__(self, event):
        self.ids.setdefault(event.row, []).append(event.token_id)
        if event.finish_reason:
            self.reason[event.row] = event.finish_reason


def alone(generator, prompt, **options):
    return generator.generate([prompt], **options).ids[0]


def drain(sched, limit=400):
    for _ in range(limit):
        if not (sched.stats.active or sched.stats.queued):
            return
        sched.step()
    raise AssertionError(f"scheduler not done after {limit} steps")


def rows_move_and_widen_intact(pool) -> None:
    """remove() moves the last row into the hole, a wider width re-lays the rows: their slots keep their values
    (`pool`: empty, room for 4 rows of 256 slots)."""
    rng = np.random.default_rng(0)
    for rid in range(3):
        pool.add(rid, 200)
        pool.set_length(rid, 10 + rid)
    want = {}
    for t in range(len(pool.names)):
        values = rng.standard_normal((3, pool.heads, pool.width, pool.head_dim)).astype(pool.dtype)
        pool.write(t, values)
        want[t] = {rid: values[j, :, :pool.ends[j]] for j, rid in enumerate(pool.rows)}
    width = pool.width
    pool.remove(0)  # row 2 moves into slot 0
    assert pool.rows == [2, 1]
    pool.set_length(1, 300)  # wider than the rows' reservation: the width had grown straight to it
    assert pool.width > width and pool.repacks >= 2
    for t in range(len(pool.names)):
        got = pool.read(t)
        np.testing.assert_array_equal(got[0, :, :12], want[t][2])
        np.testing.assert_array_equal(got[1, :, :11], want[t][1])


def test_pool_rows_move_and_widen_intact(generator):
    rows_move_and_widen_intact(KVPool(generator.session, max_rows=4, capacity_tokens=4 * 256))


def test_chunked_prefill_keeps_decoding_and_tokens(generator):
    """A long prompt prefilled 5 tokens a step beside a running row: the running row gets a token every step (no
    stall), and both get their alone tokens (greedy and seeded sampling)."""
    sched, got = Scheduler(generator, max_batch=4, prefill_tokens=5), Collect()
    short = sched.submit("We", got, max_new_tokens=40, ignore_eos=True)
    sched.step()
    long = sched.submit(LONG, got, max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    n = len(generator.encode(LONG)[0])
    counts = []
    while long not in got.ids:
        sched.step()
        counts.append(len(got.ids[short]))
    assert len(counts) == -(-n // 5)  # one chunk a step
    assert np.all(np.diff(counts) == 1)  # the running row advanced at every chunk
    drain(sched)
    assert sched.stats.prefill_tokens == n + 1
    assert got.ids[short] == alone(generator, "We", max_new_tokens=40, ignore_eos=True)
    assert got.ids[long] == alone(generator, LONG, max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True)


def test_long_prompt_progresses_under_steady_short_traffic(generator):
    """Fair both ways: under a new short request every step, the long prompt (the oldest) gets at least half the
    budget each step, so its first token comes within ceil(prompt / half) steps, and the short ones are served
    meanwhile instead of waiting for its whole prefill."""
    sched, got = Scheduler(generator, max_batch=8, prefill_tokens=6), Collect()
    long = sched.submit(LONG, got, max_new_tokens=3, ignore_eos=True)
    n = len(generator.encode(LONG)[0])
    shorts = []
    for step in range(60):  # noqa: B007 -- the step count is checked after the loop
        shorts.append(sched.submit("The state of the Union is", got, max_new_tokens=2, ignore_eos=True))
        sched.step()
        if long in got.ids:
            break
    assert -(-n // 6) <= step + 1 <= -(-n // 3)
    assert sum(1 for rid in shorts if rid in got.ids) >= (step + 1) // 3  # short prompts got first tokens meanwhile
    drain(sched)
    assert got.ids[long] == alone(generator, LONG, max_new_tokens=3, ignore_eos=True)
    want = alone(generator, "The state of the Union is", max_new_tokens=2, ignore_eos=True)
    assert all(got.ids[rid] == want for rid in shorts)


def test_prefix_reuse_is_exact_and_counted(generator):
    """A follow-up that re-sends a finished request's prompt and answer reuses its blocks (counted as hits) and
    gets the same tokens as without the prefix cache."""
    (first,) = generator.encode([LONG])
    outputs = {}
    for reuse in (True, False):
        sched, got = Scheduler(generator, max_batch=4, prefix_cache=reuse, prefix_block=4), Collect()
        a = sched.submit(first, got, max_new_tokens=8, ignore_eos=True)
        drain(sched)
        follow = first + got.ids[a] + generator.encode([" and so"])[0]
        b = sched.submit(follow, got, max_new_tokens=10, ignore_eos=True)
        drain(sched)
        outputs[reuse] = got.ids[b]
        hits = sched.stats.prefix_hits
        if reuse:
            assert hits >= (len(first) + 7) // 4 * 4 - 4 and sched.pool.prefix.hit_rate() > 0
        else:
            assert hits == 0
    assert outputs[True] == outputs[False] == alone(generator, follow, max_new_tokens=10, ignore_eos=True)


def test_prefix_cache_evicts_least_recently_used(generator):
    """A prefix cache of a few blocks keeps the most recent chain; older chains are evicted, not mixed up."""
    per_block = token_bytes(generator.session) * 4
    # a quarter of the memory is the prefix arena: 3 blocks of 4 tokens
    sched = Scheduler(generator, max_batch=2, prefix_block=4, kv_cache_memory=per_block * 12)
    got = Collect()
    prompts = [list(range(100 + 20 * k, 113 + 20 * k)) for k in range(3)]
    for p in prompts:
        sched.submit(p, got, max_new_tokens=1)
        drain(sched)
    prefix = sched.pool.prefix
    assert prefix.evictions > 0 and len(prefix.index) <= 3
    before = sched.stats.prefix_hits
    rid = sched.submit(prompts[-1] + [7], got, max_new_tokens=4, ignore_eos=True)
    drain(sched)
    assert sched.stats.prefix_hits > before  # the latest chain is still there
    assert got.ids[rid] == alone(generator, prompts[-1] + [7], max_new_tokens=4, ignore_eos=True)


def test_admission_waits_for_memory_and_refuses_what_never_fits(generator):
    per_token = token_bytes(generator.session)
    sched = Scheduler(generator, max_batch=8, prefix_cache=False, kv_cache_memory=per_token * 64)
    got = Collect()
    rids = [sched.submit("We", got, max_new_tokens=20, ignore_eos=True) for _ in range(4)]  # 21 slots each: 3 fit
    sched.step()
    assert sched.stats.active == 3 and sched.stats.queued == 1
    drain(sched)
    want = alone(generator, "We", max_new_tokens=20, ignore_eos=True)
    assert all(got.ids[r] == want for r in rids)
    with pytest.raises(RuntimeShapeError, match=r"prompt \(1 tokens\) \+ max_new_tokens \(80\) exceeds the KV-cache "
                                                r"pool's 64 tokens"):
        sched.submit("We", got, max_new_tokens=80)


def test_reservation_at_admission_means_no_request_is_ever_preempted(generator):
    """Instead of preemption (vLLM's recompute), prompt + max_new_tokens is reserved at admission: on a pool of two
    rows' reservations, five requests that all grow to their whole reservation never need a slot the pool lacks --
    at every step the live rows, each at its full reservation, fit the pool -- so each admitted request runs to its
    last token with its alone tokens while the others wait their turn (never more than two live)."""
    per_token = token_bytes(generator.session)
    prompts = [LONG, "We", "Tonight", LONG + " and", "Our economy"]
    need = max(len(generator.encode([p])[0]) for p in prompts) + 24
    sched = Scheduler(generator, max_batch=8, prefix_cache=False, prefill_tokens=8,
                      kv_cache_memory=per_token * 2 * need)
    got = Collect()
    rids = [sched.submit(p, got, max_new_tokens=24, ignore_eos=True) for p in prompts]
    live_most = 0
    for _ in range(400):
        if not (sched.stats.active or sched.stats.queued):
            break
        sched.step()
        pool = sched.pool
        assert len(pool.rows) * max(pool.reserved, default=0) <= pool.capacity  # worst case: all grown at once
        live_most = max(live_most, len(pool.rows))
    assert live_most == 2 and sched.stats.failed == 0
    for rid, p in zip(rids, prompts):
        assert got.reason[rid] == "length" and got.ids[rid] == alone(generator, p, max_new_tokens=24, ignore_eos=True)


def test_cancelled_row_frees_its_slots_at_the_next_step(generator):
    sched, got, gone = Scheduler(generator, max_batch=4), Collect(), []
    keep = sched.submit("Tonight", got, max_new_tokens=12, ignore_eos=True)
    drop = sched.submit(LONG, got, max_new_tokens=12, ignore_eos=True, is_cancelled=lambda: bool(gone))
    sched.step()
    assert drop in sched.pool.rows
    gone.append(True)
    sched.step()
    assert sched.pool.rows == [keep] and sched.stats.cancelled == 1
    drain(sched)
    assert got.ids[keep] == alone(generator, "Tonight", max_new_tokens=12, ignore_eos=True)


def test_a_failing_row_fails_alone(generator, monkeypatch):
    """A run that fails for one row is retried row by row: that row gets its error, the others go on; a raising
    callback ends its own request only."""
    sched, got, errors = Scheduler(generator, max_batch=4), Collect(), {}
    run = sched.pool.run
    bad = []

    def flaky(rids, *args, **kwargs):
        if bad and bad[0] in rids:
            raise RuntimeError("row failed")
        return run(rids, *args, **kwargs)

    monkeypatch.setattr(sched.pool, "run", flaky)

    def raising(event):
        got(event)
        if len(got.ids[event.row]) == 3:
            raise ValueError("client callback broke")

    a = sched.submit("Tonight", got, max_new_tokens=10, ignore_eos=True)
    b = sched.submit("We", got, max_new_tokens=10, ignore_eos=True, on_error=lambda e: errors.setdefault("b", e))
    c = sched.submit("Our economy", raising, max_new_tokens=10, ignore_eos=True,
                     on_error=lambda e: errors.setdefault("c", e))
    sched.step()
    bad.append(b)
    drain(sched)
    assert str(errors["b"]) == "row failed" and len(got.ids[b]) == 2
    assert str(errors["c"]) == "client callback broke" and len(got.ids[c]) == 3
    assert sched.stats.failed == 2 and not sched.pool.rows
    assert got.ids[a] == alone(generator, "Tonight", max_new_tokens=10, ignore_eos=True)


def test_fp16_static_export_on_the_pool(tmp_path):
    out = tmp_path / "fp16"
    export_checkpoint(default_checkpoint(), out, ExportOptions(kv_cache="static", dtype="fp16"), log=lambda *_: None)
    gen = Generator.from_artifacts(out, threads=2)
    sched, got = Scheduler(gen, max_batch=4, prefill_tokens=6, prefix_block=4), Collect()
    rids = [sched.submit(p, got, max_new_tokens=10, ignore_eos=True) for p in (LONG, "We", LONG)]
    drain(sched)
    assert sched.pool is not None and sched.stats.prefix_hits > 0 and sched.pool.form == "export"
    for rid, p in zip(rids, (LONG, "We", LONG)):
        assert got.ids[rid] == alone(gen, p, max_new_tokens=10, ignore_eos=True), p


def test_health_reports_a_stuck_step(generator, monkeypatch):
    import time

    from neoxrt.runtime import scheduler as module

    sched = Scheduler(generator)
    sched.start()
    try:
        assert sched.health() is None
        monkeypatch.setattr(sched, "_step_started", time.monotonic() - module.STUCK_S - 5)
        assert "a scheduler step has run for" in sched.health()
    finally:
        sched._step_started = None
        sched.stop()


def random_load_is_exact(sched, reference, rng, arrivals: int, longest_prompt: int, longest_answer: int) -> None:
    """Arrivals at random steps (the first `arrivals`), random prompt and answer lengths, shared prefixes, a few
    cancellations: nothing fails, the pool never holds more than its capacity and empties, and every request that
    ran to its end got the tokens `reference` gives it alone."""
    got, gone, submitted = Collect(), set(), {}
    shared = list(rng.integers(100, 5000, 12))
    for step in range(400):
        if step < arrivals and rng.random() < 0.4:
            prompt = shared[:int(rng.integers(0, 13))] + list(rng.integers(100, 5000, int(rng.integers(1, longest_prompt))))
            options = dict(max_new_tokens=int(rng.integers(1, longest_answer)), ignore_eos=True)
            mine = len(submitted)  # the id submit gives it (ids count from 0)
            rid = sched.submit(prompt, got, is_cancelled=lambda mine=mine: mine in gone, **options)
            assert rid == mine
            submitted[rid] = (prompt, options)
            if rng.random() < 0.1:
                gone.add(rid)  # cancelled while queued or soon after it starts
        sched.step()
        assert sched.pool.used_tokens() <= sched.pool.capacity
        if step >= arrivals and not (sched.stats.active or sched.stats.queued):
            break
    assert not sched.pool.rows and sched.stats.failed == 0 and sched.stats.cancelled == len(gone) > 0
    finished = [rid for rid in submitted if rid not in gone]
    assert sched.stats.prefix_hits > 0 and len(finished) > 10
    for rid in finished:
        prompt, options = submitted[rid]
        assert got.ids[rid] == alone(reference, prompt, **options), rid


@pytest.mark.parametrize("form", ["gqa", "gqa-one-row", "export"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_load_on_a_small_pool_keeps_every_request_exact(generator, seed, form, monkeypatch):
    """A pool of 200 slots and a budget of 7 tokens under a random load (`random_load_is_exact`), on the pool's
    GroupQueryAttention form of the graph (several rows a chunk after a past, with query_seqlens; one row a run
    with the kernel before it) and on the graph as exported (several rows a chunk)."""
    if form != "gqa":
        monkeypatch.setattr(generator.session, "_pool", None)  # an earlier pool's form, shared otherwise
    if form == "export":
        monkeypatch.setattr("neoxrt.runtime.pool_graph.gqa_graph", lambda path: None)
    if form == "gqa-one-row":
        monkeypatch.setattr("neoxrt.runtime.pool_graph.takes_query_seqlens", lambda: False)
    sched = Scheduler(generator, max_batch=5, max_queue=100, prefill_tokens=7, prefix_block=4,
                      kv_cache_memory=token_bytes(generator.session) * 200 * 4 // 3)
    assert sched.pool.form == form.removesuffix("-one-row")
    assert sched.pool.chunk_pasts == (form != "gqa-one-row")
    random_load_is_exact(sched, generator, np.random.default_rng(seed), 60, 30, 25)


def test_prompts_arriving_together_compute_their_shared_prefix_once(generator):
    """Four prompts with one long prefix, submitted at once: the later ones wait for the first to compute the
    shared blocks and copy them (the prefix computed once, not four times), and all get their alone tokens."""
    prefix = generator.encode([LONG])[0][:33]
    prompts = [prefix + [200 + k, 300 + k] for k in range(4)]
    sched, got = Scheduler(generator, max_batch=4, prefill_tokens=16, prefix_block=4), Collect()
    runs, run = [], sched.pool.run

    def recorded(rids, ids, *args, **kwargs):
        runs.append((len(rids), ids.shape[1], any(sched.pool.length(r) for r in rids)))
        return run(rids, ids, *args, **kwargs)

    sched.pool.run = recorded
    rids = [sched.submit(p, got, max_new_tokens=5, ignore_eos=True) for p in prompts]
    drain(sched)
    # the first prompt's second chunk takes its 3-token tail (under a quarter of the budget: `tail_share`), the
    # three copied rows' own 3 tokens run as one, rows with a past
    assert sched.pool.chunk_pasts and (1, 19, True) in runs and (3, 3, True) in runs
    assert sched.stats.prefix_hits == 3 * 32
    assert sched.stats.prefill_tokens == sum(len(p) for p in prompts) - 3 * 32
    for rid, p in zip(rids, prompts):
        assert got.ids[rid] == alone(generator, p, max_new_tokens=5, ignore_eos=True)


def test_the_default_export_runs_prompt_chunks_with_the_last_logits_only(generator):
    """The default export's graph takes logits_to_keep: a run with `last` returns [b, 1, V], the last position's
    logits of the same run with every position's (a graph of last-position logits returns [b, 1, V] either way)."""
    pool = KVPool(generator.session, 2, 256)
    if pool.all_logits:
        assert pool.keeps
    ids = np.array([[510, 1375, 273, 253, 6398, 310], [187, 510, 3054, 273, 253, 8078]], np.int64)
    every = []
    for last in (False, True):
        pool.add(("r", last, 0), 8)
        pool.add(("r", last, 1), 8)
        out = pool.run([("r", last, 0), ("r", last, 1)], ids, last=last).copy()
        assert out.shape == (2, 6 if pool.all_logits and not last else 1, pool.vocab)
        every.append(out[:, -1])
        pool.remove(("r", last, 1))
        pool.remove(("r", last, 0))
    np.testing.assert_allclose(every[0], every[1], atol=1e-4)


@pytest.mark.parametrize("form", ["gqa", "export"])
def test_where_chunks_run_alone_the_oldest_keeps_the_budget_unless_a_shorter_prompt_waits(generator, form, monkeypatch):
    """Two long prompts waiting: on the pool's GroupQueryAttention form (each row's chunk its own run) the oldest
    takes the whole budget -- halving it would only buy a second, smaller run -- and a shorter prompt behind it
    still gets half; on the graph as exported (rows batched in one run) the budget is split as before."""
    if form == "export":
        monkeypatch.setattr("neoxrt.runtime.pool_graph.gqa_graph", lambda path: None)
        monkeypatch.setattr(generator.session, "_pool", None)  # an earlier pool's form, shared otherwise
    sched, got = Scheduler(generator, max_batch=4, prefill_tokens=8, prefix_cache=False), Collect()
    assert sched.pool.form == form
    first, second = (sched.submit(LONG + suffix, got, max_new_tokens=2, ignore_eos=True) for suffix in (" one", " two"))
    sched.step()
    done = {r.id: r.done for r in sched._live}
    assert (done[first], done[second]) == ((8, 0) if form == "gqa" else (4, 4))
    drain(sched)
    long, short = (sched.submit(p, got, max_new_tokens=2, ignore_eos=True) for p in (LONG + " three", "We"))
    sched.step()
    assert {r.id: r.done for r in sched._live}[long] == 7 and short in got.ids  # the short one served beside it
    drain(sched)
    for rid, prompt in ((first, LONG + " one"), (second, LONG + " two"), (long, LONG + " three"), (short, "We")):
        assert got.ids[rid] == alone(generator, prompt, max_new_tokens=2, ignore_eos=True)


def test_a_waiting_prompt_is_looked_up_in_the_prefix_cache_once(generator):
    """Prompts waiting several steps for budget are asked of the prefix cache once each, so the hit rate's
    denominator is the prompt tokens submitted (a miss asked again every step understated it)."""
    sched, got = Scheduler(generator, max_batch=4, prefill_tokens=4, prefix_block=4), Collect()
    prompts = [list(range(300, 320)), list(range(400, 440))]
    rids = [sched.submit(p, got, max_new_tokens=2, ignore_eos=True) for p in prompts]
    drain(sched)
    assert sched.stats.prefix_queries == sum(len(p) for p in prompts)
    for rid, p in zip(rids, prompts):
        assert got.ids[rid] == alone(generator, p, max_new_tokens=2, ignore_eos=True)


def test_rows_share_a_run_while_their_padding_costs_less_than_a_run(generator):
    """On a graph returning every position's logits (here without logits_to_keep, so that chunks of different
    lengths may share a run), prompt chunks of 40 and 3 tokens run apart (37 tokens of padding cost more than the
    run saved: `KVPool.run_tokens`) and chunks of 10 and 3 share one run; a graph of last-position logits runs different
    lengths apart. All get their alone tokens."""
    runs = []
    for lengths in ((40, 3), (10, 3)):
        sched, got = Scheduler(generator, max_batch=2, prefill_tokens=64, prefix_cache=False), Collect()
        sched.pool.keeps = False
        run = sched.pool.run

        def recorded(rids, ids, *args, _run=run, _lengths=lengths, **kwargs):
            runs.append((_lengths, len(rids), ids.shape[1]))
            return _run(rids, ids, *args, **kwargs)

        sched.pool.run = recorded
        prompts = [[int(t) for t in np.arange(n) * 7 % 900 + 20] for n in lengths]
        rids = [sched.submit(p, got, max_new_tokens=3, ignore_eos=True) for p in prompts]
        drain(sched)
        for rid, p in zip(rids, prompts):
            assert got.ids[rid] == alone(generator, p, max_new_tokens=3, ignore_eos=True)
    together = [((10, 3), 2, 10)] if sched.pool.all_logits else [((10, 3), 1, 10), ((10, 3), 1, 3)]
    assert [r for r in runs if r[2] > 1] == [((40, 3), 1, 40), ((40, 3), 1, 3), *together]


@pytest.mark.parametrize("run_tokens, together", [(16, False), (None, True)])
def test_a_pool_whose_run_cost_is_not_measured_pads_up_to_the_real_tokens(generator, run_tokens, together):
    """Chunks of 20 and 3 tokens (17 of padding): apart on the host pool (more than its 16 tokens a run), one run on
    a pool whose run cost is not measured (`run_tokens` None, the TensorRT engine's: padding up to the real tokens).
    Both get their alone tokens (a graph of last-position logits runs them apart either way)."""
    sched, got = Scheduler(generator, max_batch=2, prefill_tokens=64, prefix_cache=False), Collect()
    sched.pool.keeps, sched.pool.run_tokens = False, run_tokens
    runs, run = [], sched.pool.run

    def recorded(rids, ids, *args, **kwargs):
        runs.append((len(rids), ids.shape[1]))
        return run(rids, ids, *args, **kwargs)

    sched.pool.run = recorded
    prompts = [[int(t) for t in np.arange(n) * 7 % 900 + 20] for n in (20, 3)]
    rids = [sched.submit(p, got, max_new_tokens=3, ignore_eos=True) for p in prompts]
    drain(sched)
    for rid, p in zip(rids, prompts):
        assert got.ids[rid] == alone(generator, p, max_new_tokens=3, ignore_eos=True)
    together = together and sched.pool.all_logits  # a graph of last-position logits runs different lengths apart
    assert [r for r in runs if r[1] > 1] == ([(2, 20)] if together else [(1, 20), (1, 3)])


@pytest.mark.parametrize("tail_share, chunks", [(0.25, [8, 10]), (0.0, [8, 8, 2])])
def test_a_prompt_takes_a_short_tail_with_its_chunk(generator, tail_share, chunks):
    """An 18-token prompt at a budget of 8: its last 2 tokens (a quarter of the chunk or less: `tail_share`) come
    with the second chunk, no run of their own; with `tail_share` 0 the budget holds exactly. The tokens are the
    alone ones either way."""
    sched, got = Scheduler(generator, max_batch=2, prefill_tokens=8, prefix_cache=False), Collect()
    sched.pool.tail_share = tail_share
    runs, run = [], sched.pool.run

    def recorded(rids, ids, real=None, *args, **kwargs):
        runs.append(int(np.max(real)) if real is not None else ids.shape[1])
        return run(rids, ids, real, *args, **kwargs)

    sched.pool.run = recorded
    prompt = [int(t) for t in np.arange(18) * 11 % 900 + 20]
    rid = sched.submit(prompt, got, max_new_tokens=3, ignore_eos=True)
    drain(sched)
    assert got.ids[rid] == alone(generator, prompt, max_new_tokens=3, ignore_eos=True)
    assert runs[:len(chunks)] == chunks and all(n == 1 for n in runs[len(chunks):])


def test_a_row_attending_the_shared_prefix_decodes_as_one_holding_it(generator):
    """Two rows with one 200-token prompt: one keeps its slots, the other attends its first 192 tokens as the
    shared prefix (held once, not in its slots: `KVPool.attach`). Decode steps of both rows in one run give the
    same logits (to float rounding: the prefix's softmax merged in the kernel's) for 6 steps; where the graph has
    no shared-prefix form (last-position logits), attach declines."""
    pool = Scheduler(generator, max_batch=4, prefix_cache=False).pool
    prompt = [int(t) for t in np.arange(200) * 13 % 900 + 20]
    for rid in (0, 1):
        pool.add(rid, 260)
        pool.run([rid], np.array([prompt], np.int64), last=True)
    if not pool.shares:
        assert not pool.attach(1, prompt, 192) and pool.offsets == [0, 0]
        return
    assert not pool.attach(1, prompt, 64)  # shorter than MIN_SHARED copied: no shared prefix made
    assert pool.attach(1, prompt, 192)
    assert pool.offsets == [0, 192] and pool.ends == [200, 8] and len(pool.shared[0]) == 192
    token = 77
    for _ in range(6):
        logits = pool.run([0, 1], np.array([[token], [token]], np.int64)).copy()
        assert logits.shape == (2, 1, pool.vocab)
        np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=2e-4)
        token = int(np.argmax(logits[0, -1]))
    assert pool.ends == [206, 14]
    # a row attending it cannot run a chunk; a prompt of other tokens does not attach
    with pytest.raises(RuntimeShapeError, match="one token a step"):
        pool.run([1], np.array([[1, 2]], np.int64))
    pool.add(2, 260)
    other = [t + 1 for t in prompt]
    pool.run([2], np.array([other], np.int64), last=True)
    assert not pool.attach(2, other, 192)


def test_prompts_sharing_a_long_prefix_attend_it_once_and_get_their_alone_tokens(generator):
    """A 160-token prefix computed by a first request; four more prompts starting with it, submitted together:
    they copy it from the prefix cache and attend one shared copy while decoding (`KVPool.attach`), and each gets
    the tokens it gets alone."""
    prefix = (generator.encode([LONG * 6])[0] * 4)[:160]
    sched, got = Scheduler(generator, max_batch=5, prefill_tokens=64, prefix_block=16), Collect()
    first = sched.submit(prefix + [500], got, max_new_tokens=4, ignore_eos=True)
    drain(sched)
    prompts = [prefix + [200 + k, 300 + k, 400 + k] for k in range(4)]
    rids = [sched.submit(p, got, max_new_tokens=8, ignore_eos=True) for p in prompts]
    drain(sched)
    assert got.ids[first] == alone(generator, prefix + [500], max_new_tokens=4, ignore_eos=True)
    for rid, p in zip(rids, prompts):
        assert got.ids[rid] == alone(generator, p, max_new_tokens=8, ignore_eos=True)
    assert sched.stats.shared_prefix_rows == (4 if sched.pool.shares else 0)
