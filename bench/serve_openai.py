"""`make bench-openai`: the OpenAI endpoint's cost, against Triton's path and against the scheduler itself.

Three fronts, the same scheduler code and artifact: the OpenAI endpoint and Triton's generate_stream on one
`neoxrt serve` process (the endpoint runs inside the Triton model's process, on its scheduler), and a
`Scheduler` in this process with no server at all (the same ONNX Runtime threads; the server sits idle then).
Each round runs N concurrent clients through each front (streaming, greedy, `ignore_eos`, 32-token prompts);
the order rotates round by round so that a change of the shared machine's load hits every front. Reported:
tokens/s per front and round, the OpenAI/Triton and OpenAI/scheduler ratios per round, pooled and median; and
the CPU seconds per token of the serving side (the server's process tree for Triton and OpenAI, this process for
the scheduler alone), which the neighbours' load moves far less than wall time -- on a machine of its own, a
CPU-bound server's tokens/s is the inverse of it. Target: the OpenAI front costs <= 5 % of the scheduler's
tokens/s at 16 clients.

Writes bench-results/openai.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from neoxrt.bench.serve import (
    Served,
    common_args,
    cpu_seconds,
    phase,
    prompts_of,
    stream_one,
    stream_openai,
    write_results,
)

TARGET_OVERHEAD = 0.05
FRONTS = ("scheduler", "triton", "openai")


class InProcess:
    """The scheduler with no server: one blocking `send` per client thread, timed as the SSE clients are."""

    def __init__(self, artifact: Path, threads: int, max_batch: int):
        from neoxrt.runtime import Generator
        from neoxrt.runtime.scheduler import Scheduler

        self.scheduler = Scheduler(Generator.from_artifacts(artifact, threads=threads), max_batch=max_batch)
        self.scheduler.start()

    def send(self, prompt: str, new_tokens: int) -> dict:
        done, first, count = threading.Event(), [], [0]

        def on_event(event):
            first or first.append(time.perf_counter())
            count[0] += 1
            if event.finish_reason:
                done.set()

        start = time.perf_counter()
        self.scheduler.submit(prompt, on_event, max_new_tokens=new_tokens, ignore_eos=True)
        done.wait(600)
        end = time.perf_counter()
        return dict(ttft_ms=(first[0] - start) * 1e3, latency_ms=(end - start) * 1e3, tokens=count[0])


def run(args) -> dict:
    from neoxrt.bench.run import neoxrt_artifact
    from neoxrt.bench.shapes import shape_checkpoint

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.shape == "default":
        from neoxrt.assets import DEFAULT_MODEL_DIR

        artifact = neoxrt_artifact("pythia-14m-sotu", DEFAULT_MODEL_DIR, "fused-last", root)
    else:
        artifact = neoxrt_artifact(args.shape, shape_checkpoint(args.shape, root), "fused-last", root)
    prompts = prompts_of(32, 64)
    served = Served(artifact, args.threads, args.clients, args.port, openai=True)
    local = InProcess(artifact, args.threads, args.clients)
    fronts = {"scheduler": local.send, "triton": lambda p, n: stream_one(served.http, p, n),
              "openai": lambda p, n: stream_openai(served.openai, p, n)}
    rounds = []
    try:
        for send in fronts.values():  # warm-up, every path
            send(prompts[0], 4)
        for r in range(args.rounds):
            order = FRONTS[r % 3:] + FRONTS[:r % 3]
            got = {}
            for name in order:
                pid = os.getpid() if name == "scheduler" else served.proc.pid
                cpu = cpu_seconds(pid)
                got[name] = phase(served, prompts, args.clients, args.requests_each, args.new_tokens, send=fronts[name])
                got[name]["cpu_ms_per_token"] = (cpu_seconds(pid) - cpu) * 1e3 / got[name]["tokens"]
            rounds.append(dict(order=order, **got, vs_triton=got["openai"]["tokens_per_s"] / got["triton"]["tokens_per_s"],
                               vs_scheduler=got["openai"]["tokens_per_s"] / got["scheduler"]["tokens_per_s"]))
            print(f"round {r + 1}: " + ", ".join(f"{k} {got[k]['tokens_per_s']:.1f} tok/s "
                                                f"{got[k]['cpu_ms_per_token']:.2f} CPU ms/token" for k in order)
                  + f"; openai/triton {rounds[-1]['vs_triton']:.3f}, openai/scheduler {rounds[-1]['vs_scheduler']:.3f}",
                  flush=True)
    finally:
        local.scheduler.stop()
        served.stop()
    pooled = {k: sum(r[k]["tokens"] for r in rounds) / sum(r[k]["wall_s"] for r in rounds) for k in fronts}
    cpu = {k: float(np.median([r[k]["cpu_ms_per_token"] for r in rounds])) for k in fronts}
    return dict(rounds=rounds, pooled_tokens_per_s=pooled, vs_triton=pooled["openai"] / pooled["triton"],
                vs_scheduler=pooled["openai"] / pooled["scheduler"],
                median_vs_scheduler=float(np.median([r["vs_scheduler"] for r in rounds])),
                median_vs_triton=float(np.median([r["vs_triton"] for r in rounds])), cpu_ms_per_token=cpu,
                cpu_vs_scheduler=cpu["openai"] / cpu["scheduler"], cpu_vs_triton=cpu["openai"] / cpu["triton"],
                shape=args.shape, clients=args.clients,
                new_tokens=args.new_tokens, threads=args.threads,
                machine=f"{os.cpu_count()} CPUs, shared with other jobs while measured (ratios within one run)")


def markdown(result: dict) -> str:
    md = [f"# OpenAI endpoint vs Triton path, one `neoxrt serve` ({result['shape']}, {result['clients']} clients, "
          f"{result['new_tokens']} new tokens, SSE)", "", result["machine"], "",
          "| round | order | scheduler tok/s | Triton tok/s | OpenAI tok/s | OpenAI/scheduler | OpenAI/Triton "
          "| CPU ms/token scheduler / Triton / OpenAI | TTFT p50 ms scheduler / Triton / OpenAI |",
          "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rounds"], 1):
        md.append(f"| {i} | {', '.join(r['order'])} | " + " | ".join(f"{r[k]['tokens_per_s']:.1f}" for k in FRONTS)
                  + f" | {r['vs_scheduler']:.3f} | {r['vs_triton']:.3f} | "
                  + " / ".join(f"{r[k]['cpu_ms_per_token']:.2f}" for k in FRONTS) + " | "
                  + " / ".join(f"{r[k]['ttft_p50_ms']:.0f}" for k in FRONTS) + " |")
    p = result["pooled_tokens_per_s"]
    overhead = 1 - result["vs_scheduler"]
    md += ["| pooled | | " + " | ".join(f"{p[k]:.1f}" for k in FRONTS)
           + f" | {result['vs_scheduler']:.3f} | {result['vs_triton']:.3f} | | |",
           f"| median of rounds | | | | | {result['median_vs_scheduler']:.3f} | {result['median_vs_triton']:.3f} | "
           + " / ".join(f"{result['cpu_ms_per_token'][k]:.2f}" for k in FRONTS) + " | |", "",
           f"Serving CPU per token (median of rounds), OpenAI / scheduler alone: {result['cpu_vs_scheduler']:.3f}, "
           f"OpenAI / Triton: {result['cpu_vs_triton']:.3f}.",
           f"OpenAI front overhead against the scheduler alone (pooled): {overhead * 100:.1f} % of tokens/s; target <= "
           f"{TARGET_OVERHEAD * 100:.0f} %: {'met' if overhead <= TARGET_OVERHEAD else 'NOT met'}. Against Triton's "
           f"path: {(1 - result['vs_triton']) * 100:.1f} %."]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neoxrt.bench.serve_openai", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="pythia-160m", choices=("pythia-160m", "pythia-70m", "default"),
                   help="random checkpoint of this shape, or the embedded pythia-14m-sotu model")
    common_args(p, port=18500, requests_each=1)
    p.add_argument("--rounds", type=int, default=6, help="rounds; the order of the fronts rotates each round")
    args = p.parse_args(argv)
    result = run(args)
    write_results(Path(args.out), "openai", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
