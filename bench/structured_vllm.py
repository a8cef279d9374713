"""vLLM's own cost of structured outputs, for `make bench-structured`'s comparison: the same schema, prompt and token
count as bench/structured.py, constrained vs unconstrained per-token time on vLLM's CPU server (its defaults: the
structured-outputs backend it picks), at 1 client and 16 concurrent clients, rounds interleaved.

    python -m neoxrt.bench.structured_vllm --vllm-python .cache/vllm-venv/bin/python [--shape pythia-14m-sotu]
                                           [--rounds 5] [--tokens 48]

The constraint is bench/structured.py's SCHEMA (one string of 400 to 420 characters): every constrained request
reaches max_tokens, as the unconstrained ones do (ignore_eos). Prints and returns {batch: (unconstrained ms/token,
constrained ms/token, ratio)} from each phase's median round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

from neoxrt.bench.results import add_results_flag, command_line
from neoxrt.bench.serve import VllmServed, vllm_python
from neoxrt.bench.structured import PROMPT, SCHEMA


def complete(base: str, tokens: int, constrained: bool, seed: int) -> int:
    """One non-streamed /v1/completions request; the completion tokens the server counted."""
    body = {"model": "neoxrt", "prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0, "seed": seed}
    body.update({"structured_outputs": {"json": SCHEMA}} if constrained else {"ignore_eos": True})
    req = urllib.request.Request(f"{base}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return out["usage"]["completion_tokens"]


def phase(base: str, clients: int, tokens: int, constrained: bool, seed: int) -> float:
    """ms per generated token: wall time of `clients` concurrent requests over their tokens."""
    counts = [0] * clients

    def one(c: int) -> None:
        counts[c] = complete(base, tokens, constrained, seed + c)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - start) * 1e3 / sum(counts)


def measure(base: str, rounds: int, tokens: int) -> dict:
    complete(base, 4, True, 0)  # compile the grammar once, warm up
    out = {}
    for clients in (1, 16):
        times = {False: [], True: []}
        for k in range(rounds):
            for constrained in (False, True) if k % 2 == 0 else (True, False):
                times[constrained].append(phase(base, clients, tokens, constrained, 100 * k))
        free, bound = statistics.median(times[False]), statistics.median(times[True])
        out["batch 1" if clients == 1 else f"{clients} concurrent"] = (round(free, 3), round(bound, 3), round(bound / free, 3))
    return out


def checkpoint(shape: str, root: Path) -> Path:
    if shape == "pythia-14m-sotu":  # a copy: vLLM's log is written beside the checkpoint
        from neoxrt.assets import DEFAULT_MODEL_DIR

        folder = root / shape
        if not folder.is_dir():
            shutil.copytree(DEFAULT_MODEL_DIR, folder)
        return folder
    from neoxrt.bench.shapes import shape_checkpoint

    return shape_checkpoint(shape, root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neoxrt.bench.structured_vllm", description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--shapes", nargs="+", default=["pythia-14m-sotu", "pythia-70m"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=18700)
    p.add_argument("--root", type=Path, default=Path(".cache/bench-structured"))
    add_results_flag(p, "structured-vllm")
    args = p.parse_args(argv)
    python = vllm_python(args.vllm_python)
    if python is None:
        print("vLLM: not installed (make vllm-venv, or --vllm-python): nothing measured")
        return 0
    result = {}
    for shape in args.shapes:
        served = VllmServed(python, checkpoint(shape, args.root), "float32", args.threads, 16, args.port,
                            max_model_len=512, kv_space=None)
        try:
            result[shape] = measure(served.openai, args.rounds, args.tokens)
        finally:
            served.stop()
        print(json.dumps({shape: result[shape]}), flush=True)
    if args.results:
        publish(result, args.results, command_line("neoxrt.bench.structured_vllm", argv))
    return 0


def publish(result: dict, name: str, command: str, measured: dict | None = None) -> None:
    """docs/results/NAME.json: vLLM's rows in bench/structured.py's columns (serving.md sets them beside ours)."""
    from neoxrt.bench.results import write_result

    rows = [[shape, batch, *figures] for shape, phases in result.items() for batch, figures in phases.items()]
    write_result(name, "Structured outputs on vLLM 0.32 CPU: per-token cost, constrained against unconstrained",
                 ["shape", "batch", "unconstrained ms/token", "constrained ms/token", "ratio"], rows, command=command,
                 reference="the unconstrained column, same server, rounds interleaved", measured=measured,
                 notes="vLLM's OpenAI server with its defaults (its structured-outputs backend), fp32, 2 threads; "
                       "the schema, prompt and token count of bench/structured.py; wall time of 1 or 16 concurrent "
                       "non-streamed /v1/completions requests over their completion tokens, median of the rounds.")


if __name__ == "__main__":
    sys.exit(main())
