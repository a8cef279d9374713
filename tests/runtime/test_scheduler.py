"""In-flight batching: requests join the running batch mid-decode, keep their own options and seed, and get
the tokens they get alone -- on the portable path (dynamic cache) and on the KV-cache pool (static cache, with
all logits and with the last position's only)."""

import threading

import pytest

from neox_testing import default_checkpoint
from neoxrt.errors import RuntimeShapeError
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions
from neoxrt.runtime import Generator
from neoxrt.runtime.scheduler import QueueFullError, RequestCancelled, Scheduler, SchedulerDown

QUIET = dict(log=lambda *_: None)
REQUESTS = [  # (prompt, options): greedy, seeded sampling of each kind, penalty, stop string
    ("The state of the Union is", dict(max_new_tokens=24)),
    ("We", dict(max_new_tokens=9, temperature=0.8, seed=1)),
    ("Gentlemen of the Senate and House of Representatives: it is", dict(max_new_tokens=17, temperature=1.2, top_k=20,
                                                                         seed=7)),
    ("Our economy", dict(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=3, repetition_penalty=1.3)),
    ("Tonight", dict(max_new_tokens=30, stop_strings=("America",), ignore_eos=True)),
]


CACHES = {"arrays": dict(attention="decomposed"), "pool": dict(kv_cache="static"),
          "pool-last": dict(kv_cache="static", logits="last")}


@pytest.fixture(scope="module", params=list(CACHES))
def generator(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("sched") / request.param
    export_checkpoint(default_checkpoint(), out, ExportOptions(**CACHES[request.param]), **QUIET)
    return Generator.from_artifacts(out, threads=2)


def test_static_artifacts_get_the_pool(generator):
    sched = Scheduler(generator)
    assert (sched.pool is not None) == (generator.manifest["export_options"]["kv_cache"] == "static")


class Collect:
    def __init__(self):
        self.ids, self.text, self.reason = {}, {}, {}

    def __call__(self, event):
        self.ids.setdefault(event.row, []).append(event.token_id)
        self.text[event.row] = self.text.get(event.row, "") + event.text
        if event.finish_reason:
            self.reason[event.row] = event.finish_reason


def alone(generator, prompt, options):
    result = generator.generate([prompt], **options)
    return result.ids[0], result.text[0], result.finish_reasons[0]


def test_staggered_requests_get_their_alone_tokens(generator):
    sched, got = Scheduler(generator, max_batch=4), Collect()
    rids = []
    for prompt, options in REQUESTS:  # one arrives every other step; the fifth waits for a free row
        rids.append(sched.submit(prompt, got, **options))
        sched.step()
        sched.step()
    while sched.stats.active or sched.stats.queued:
        sched.step()
    assert sched.stats.row_steps > sched.stats.steps  # rows really shared steps
    for rid, (prompt, options) in zip(rids, REQUESTS):
        ids, text, reason = alone(generator, prompt, options)
        assert got.ids[rid] == ids, prompt
        assert got.reason[rid] == reason
        if reason != "stop_string":
            assert got.text[rid] == text
    assert got.reason[rids[4]] in ("stop_string", "length")


def test_short_request_joins_a_long_one_and_finishes_first(generator):
    sched, got = Scheduler(generator, max_batch=4), Collect()
    long_id = sched.submit("The state of the Union is", got, max_new_tokens=60, ignore_eos=True)
    for _ in range(5):
        sched.step()
    short_id = sched.submit("We", got, max_new_tokens=4, ignore_eos=True)
    steps = 0
    while short_id not in got.reason:
        sched.step()
        steps += 1
    # joined at once (its prompt step gives its first token, then one per decode step), done mid-way
    assert steps == 3 and long_id not in got.reason
    assert len(got.ids[long_id]) == 1 + 5 + 3
    while sched.stats.active:
        sched.step()
    assert got.ids[short_id] == alone(generator, "We", dict(max_new_tokens=4, ignore_eos=True))[0]
    assert got.ids[long_id] == alone(generator, "The state of the Union is", dict(max_new_tokens=60, ignore_eos=True))[0]


def test_cancelled_rows_leave_and_the_rest_is_unchanged(generator):
    sched, got = Scheduler(generator, max_batch=4), Collect()
    gone = threading.Event()
    keep = sched.submit("Tonight", got, max_new_tokens=20, ignore_eos=True)
    drop = sched.submit("We", got, max_new_tokens=20, ignore_eos=True, is_cancelled=gone.is_set)
    queued_drop = sched.submit("Our", got, max_new_tokens=5, is_cancelled=lambda: True)
    sched.step()
    gone.set()
    while sched.stats.active:
        sched.step()
    assert len(got.ids[drop]) == 2 and drop not in got.reason  # its prompt-step token and one decode step
    assert queued_drop not in got.ids  # cancelled while queued: never admitted
    assert sched.stats.cancelled == 2
    assert got.ids[keep] == alone(generator, "Tonight", dict(max_new_tokens=20, ignore_eos=True))[0]


def test_bounded_queue_and_context_are_refused(generator):
    sched = Scheduler(generator, max_batch=1, max_queue=2)
    for _ in range(2):
        sched.submit("We", lambda e: None, max_new_tokens=2)
    with pytest.raises(QueueFullError, match="max_queue 2"):
        sched.submit("We", lambda e: None, max_new_tokens=2)
    with pytest.raises(RuntimeShapeError, match="exceeds the model's context of 2048"):
        sched.submit("We", lambda e: None, max_new_tokens=5000)
    with pytest.raises(RuntimeShapeError, match="top_p"):
        sched.submit("We", lambda e: None, top_p=5.0)


def test_threaded_loop_serves_concurrent_submitters(generator):
    sched, got, done = Scheduler(generator, max_batch=8), Collect(), threading.Event()
    finished = []

    def on_event(event):
        got(event)
        if event.finish_reason:
            finished.append(event.row)
            if len(finished) == 6:
                done.set()

    sched.start()
    try:
        rids = [sched.submit(p, on_event, max_new_tokens=8 + i) for i, p in enumerate(["We", "The", "Our", "It", "A", "In"])]
        assert done.wait(60)
    finally:
        sched.stop()
    assert sched._thread is not None and not sched._thread.is_alive()
    for i, (rid, p) in enumerate(zip(rids, ["We", "The", "Our", "It", "A", "In"])):
        assert got.ids[rid] == alone(generator, p, dict(max_new_tokens=8 + i))[0]


def test_prefill_budget_admits_a_burst_group_by_group(generator):
    if Scheduler(generator).pool is not None:
        pytest.skip("the pool admits by memory and chunks prompts: tests/runtime/test_kv_pool.py")
    sched, got = Scheduler(generator, max_batch=8, prefill_tokens=7), Collect()
    prompts = ["The state of the Union", "Our economy is strong", "We will win", "Tonight we meet"]
    sizes = [len(generator.encode(p)[0]) for p in prompts]
    assert all(3 <= n <= 7 for n in sizes) and sizes[0] + sizes[1] > 7
    rids = [sched.submit(p, got, max_new_tokens=6, ignore_eos=True) for p in prompts]
    active = []
    for _ in range(3):
        sched.step()
        active.append(sched.stats.active)
    assert active[0] == 1 and active[-1] >= 2  # one prompt the first step, the others on later steps
    while sched.stats.active or sched.stats.queued:
        sched.step()
    for rid, p in zip(rids, prompts):
        assert got.ids[rid] == alone(generator, p, dict(max_new_tokens=6, ignore_eos=True))[0]


def test_logits_processors_keep_their_alone_tokens_in_the_batch(generator):
    sched, got = Scheduler(generator, max_batch=4), Collect()
    requests = [("The state of the Union is", dict(max_new_tokens=20, no_repeat_ngram_size=2)),
                ("We", dict(max_new_tokens=12, min_new_tokens=10, temperature=0.7, seed=5)),
                ("Our economy", dict(max_new_tokens=10, bad_words_ids=[[13]]))]
    rids = [sched.submit(p, got, **o) for p, o in requests]
    while sched.stats.active or sched.stats.queued:
        sched.step()
    for rid, (prompt, options) in zip(rids, requests):
        assert got.ids[rid] == alone(generator, prompt, options)[0], prompt


def test_generation_config_defaults_apply_as_in_generate(generator, monkeypatch):
    monkeypatch.setattr(generator, "defaults", {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2})
    sched, got = Scheduler(generator), Collect()
    rid = sched.submit("The state of the Union is", got, max_new_tokens=16)
    while sched.stats.active or sched.stats.queued:
        sched.step()
    with_defaults = alone(generator, "The state of the Union is", dict(max_new_tokens=16))[0]
    monkeypatch.setattr(generator, "defaults", {})
    assert got.ids[rid] == with_defaults != alone(generator, "The state of the Union is", dict(max_new_tokens=16))[0]


def test_logprobs_and_prompt_logprobs_equal_the_generators(generator):
    """Token log-probs (with the top 3) and the prompt's (echo) from the shared prompt step, next to a running
    row of another length, equal Generator.generate(logprobs=3) and Generator.prompt_logprobs."""
    if generator.manifest["export_options"]["logits"] == "last":
        pytest.skip("prompt log-probabilities need every position's logits")
    sched, got, prompts = Scheduler(generator, max_batch=4), Collect(), {}
    events = []
    sched.submit("Tonight", got, max_new_tokens=20, ignore_eos=True)
    sched.step()
    prompt = "Gentlemen of the Senate and House of Representatives"
    rid = sched.submit(prompt, lambda e: (events.append(e), got(e)), max_new_tokens=6, logprobs=3,
                       on_prompt_logprobs=lambda p: prompts.setdefault("p", p))
    while sched.stats.active or sched.stats.queued:
        sched.step()
    ref = generator.generate([prompt], max_new_tokens=6, logprobs=3).logprobs[0]
    assert got.ids[rid] == [r["token"] for r in ref]
    for event, r in zip(events, ref):
        assert event.logprob == pytest.approx(r["logprob"], abs=1e-4)
        assert [t for t, _ in event.top_logprobs] == [t for t, _ in r["top"]]
    want = generator.prompt_logprobs([prompt])[0]
    p = prompts["p"]
    assert p[0] is None and len(p) == len(want)
    assert [lp for lp, _ in p[1:]] == pytest.approx(want[1:], abs=1e-4)
    ids = generator.encode([prompt])[0]
    assert all(len(top) == 3 and max(v for _, v in top) >= lp - 1e-9 for lp, top in p[1:])
    assert sum(top[0][0] == tok for (_, top), tok in zip(p[1:], ids[1:])) >= 1  # some prompt token is the argmax


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(generator, monkeypatch):
    """An exception out of a step ends the requests it held (on_error), not the loop: later requests are served."""
    sched, got, errors, done = Scheduler(generator, max_batch=4), Collect(), [], threading.Event()
    step = sched.step
    broken = [True]

    def once():
        if broken:
            broken.clear()
            raise RuntimeError("step bug")
        step()

    monkeypatch.setattr(sched, "step", once)
    sched.start()
    try:
        sched.submit("We", got, max_new_tokens=4, on_error=lambda e: (errors.append(e), done.set()))
        assert done.wait(30) and str(errors[0]) == "step bug" and sched.health() is None
        done.clear()
        rid = sched.submit("We", lambda e: (got(e), e.finish_reason and done.set()), max_new_tokens=4)
        assert done.wait(30)
    finally:
        sched.stop()
    assert got.ids[rid] == alone(generator, "We", dict(max_new_tokens=4))[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_loop_is_reported_and_refuses_requests(generator, monkeypatch):
    """The watchdog: when the loop's thread dies, health() says so, its requests got their error, and submit
    refuses instead of queueing for nobody."""
    sched, errors = Scheduler(generator), []

    def die():
        raise SystemExit("killed")

    monkeypatch.setattr(sched, "step", die)
    assert sched.health() is None
    sched.start()
    sched.submit("We", lambda e: None, max_new_tokens=4, on_error=errors.append)
    sched._thread.join(10)
    assert "the scheduler thread has stopped: SystemExit: killed" in sched.health()
    assert len(errors) == 1 and isinstance(errors[0], SchedulerDown)
    with pytest.raises(SchedulerDown, match="thread has stopped"):
        sched.submit("We", lambda e: None, max_new_tokens=4)


def test_cancelled_requests_get_a_last_word(generator):
    """A cancelled request, queued or running, gets RequestCancelled through on_error (Triton's final response)."""
    sched, got, words = Scheduler(generator, max_batch=1), Collect(), {}
    gone = []
    running = sched.submit("We", got, max_new_tokens=30, ignore_eos=True, is_cancelled=lambda: bool(gone),
                           on_error=lambda e: words.setdefault("running", e))
    queued = sched.submit("Our", got, max_new_tokens=3, is_cancelled=lambda: bool(gone),
                          on_error=lambda e: words.setdefault("queued", e))
    sched.step()
    gone.append(True)
    sched.step()
    assert isinstance(words["running"], RequestCancelled) and isinstance(words["queued"], RequestCancelled)
    assert running in got.ids and queued not in got.ids and sched.stats.active == 0 and sched.stats.cancelled == 2
