"""The issue's three serving loads on the scheduler alone (no HTTP), the portable path (a dynamic-cache export,
--kv-cache dynamic) against the KV-cache pool (the default export: static cache), one after the other in one
process: token-id prompts, greedy, `ignore_eos`.

    long     `--clients` clients x 2 requests back to back, `--long`-token prompts, `--new` new tokens
    prefix   the same clients x 2, prompts sharing a `--prefix`-token prefix + 16 unique tokens, 16 new tokens
    mixed    `--clients` short clients (32-token prompts, 64 new) while one client sends `--long`-token prompts
             (16 new) back to back; the short clients' tokens/s and gap p99, the long prompts served
    short    bench-serve's load: 16 clients x 2 requests, 32-token prompts, 64 new tokens

    python -m neoxrt.bench.pool_loads [--shape pythia-160m] [--clients 8] [--long 1024] [--new 32] [--prefix 768]
                                      [--ways portable pool pool-last]

Ways: portable (--kv-cache dynamic, every position's logits), pool (the default export: static cache, prompt chunks
skip the LM head but at their last position through logits_to_keep), pool-last (--logits last: the graph returns
the last position's logits only).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np


class Client:
    """Sends `requests` one after the other (each the next prompt of `prompts`), records token times."""

    def __init__(self, sched, prompts: list[list[int]], new: int, until: threading.Event | None = None):
        self.sched, self.prompts, self.new, self.until = sched, prompts, new, until
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.tokens = 0
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        k = 0
        while k < len(self.prompts) or (self.until is not None and not self.until.is_set()):
            done, times = threading.Event(), []

            def on_event(e, times=times, done=done):
                times.append(time.perf_counter())
                if e.finish_reason:
                    done.set()

            start = time.perf_counter()
            self.sched.submit(self.prompts[k % len(self.prompts)], on_event, max_new_tokens=self.new,
                              ignore_eos=True, on_error=lambda e, done=done: done.set())
            done.wait(600)
            if times:
                self.ttft.append(times[0] - start)
                self.gaps += list(np.diff(times))
                self.tokens += len(times)
            k += 1


def _stats(clients: list[Client], wall: float) -> dict:
    ttft = np.array([t for c in clients for t in c.ttft]) * 1e3
    gaps = np.array([g for c in clients for g in c.gaps] or [0.0]) * 1e3
    tokens = sum(c.tokens for c in clients)
    return {"wall_s": wall, "tok_s": tokens / wall, "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p99_ms": float(np.percentile(ttft, 99)), "gap_p99_ms": float(np.percentile(gaps, 99))}


def _run(sched, clients: list[Client]) -> float:
    start = time.perf_counter()
    for c in clients:
        c.thread.start()
    for c in clients:
        c.thread.join()
    return time.perf_counter() - start


def load_long(sched, rng, args) -> dict:
    clients = [Client(sched, [list(rng.integers(10, 50000, args.long)) for _ in range(2)], args.new)
               for _ in range(args.clients)]
    return _stats(clients, _run(sched, clients))


def load_prefix(sched, rng, args) -> dict:
    shared = list(rng.integers(10, 50000, args.prefix))
    clients = [Client(sched, [shared + list(rng.integers(10, 50000, 16)) for _ in range(2)], 16)
               for _ in range(args.clients)]
    return _stats(clients, _run(sched, clients))


def load_mixed(sched, rng, args) -> dict:
    stop = threading.Event()
    longs = Client(sched, [list(rng.integers(10, 50000, args.long)) for _ in range(2)], 16, until=stop)
    shorts = [Client(sched, [list(rng.integers(10, 50000, 32))], 64) for _ in range(args.clients)]
    start = time.perf_counter()
    longs.thread.start()
    for c in shorts:
        c.thread.start()
    for c in shorts:
        c.thread.join()
    wall = time.perf_counter() - start
    stop.set()
    longs.thread.join()
    return {**_stats(shorts, wall), "long_prompts_served": len(longs.ttft)}


def load_short(sched, rng, args) -> dict:
    clients = [Client(sched, [list(rng.integers(10, 50000, 32)) for _ in range(2)], 64) for _ in range(16)]
    return _stats(clients, _run(sched, clients))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-160m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--loads", nargs="+", default=["long", "prefix", "mixed"])
    parser.add_argument("--ways", nargs="+", default=["portable", "pool"], choices=["portable", "pool", "pool-last"])
    parser.add_argument("--root", type=Path, default=Path(".cache/bench-pool"))
    args = parser.parse_args(argv)
    from neoxrt.bench.shapes import exported, shape_checkpoint
    from neoxrt.runtime import Generator
    from neoxrt.runtime.scheduler import Scheduler

    loads = {"long": load_long, "prefix": load_prefix, "mixed": load_mixed, "short": load_short}
    options = {"portable": {"kv_cache": "dynamic"}, "pool": {}, "pool-last": {"logits": "last"}}
    ckpt = shape_checkpoint(args.shape, args.root)
    suffix = {"portable": "fused", "pool": "fused-static", "pool-last": "fused-static-last"}
    ways = {w: exported(ckpt, args.root / f"{args.shape}-{suffix[w]}", options[w]) for w in args.ways}
    print(f"{args.shape}, {args.threads} threads, {args.clients} clients, --max-prefill-tokens {args.prefill_tokens}")
    print("| load | way | wall s | tok/s | TTFT p50 ms | TTFT p99 ms | gap p99 ms | long prompts |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.loads:
        for way, folder in ways.items():
            gen = Generator.from_artifacts(folder, threads=args.threads, verify=False)
            sched = Scheduler(gen, max_batch=16, prefill_tokens=args.prefill_tokens)
            sched.start()
            try:
                r = loads[name](sched, np.random.default_rng(0), args)
            finally:
                sched.stop()
            print(f"| {name} | {way} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                  f"{r['ttft_p99_ms']:.0f} | {r['gap_p99_ms']:.0f} | {r.get('long_prompts_served', '')} |", flush=True)
            del sched, gen
    return 0


if __name__ == "__main__":
    sys.exit(main())
