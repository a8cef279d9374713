"""`make bench-structured`: the per-token cost of structured outputs -- constrained vs unconstrained generation on
the same model, rounds interleaved in one process (so machine load hits both alike) -- at batch 1 (`Generator`)
and with 16 concurrent requests in one in-flight batch (`Scheduler`). Writes bench-results/structured.{json,md};
`--results` also docs/results/structured.json (docs/serving.md renders it).

    python -m neoxrt.bench.structured [--shape pythia-14m-sotu|pythia-70m|pythia-160m] [--rounds 5] [--tokens 64]
                                      [--results [NAME]]

The constraint is a JSON schema whose one string must be 400 to 420 characters long: every constrained run
reaches max_new_tokens, as the unconstrained runs do (ignore_eos), so both count the same steps. Besides the
wall-clock ratio, the constraint's own time on the loop's thread is summed in the same runs (`LoopThreadCost`):
1 + that per token / the unconstrained time per token estimates the ratio less swayed by the load (preemption
still inflates it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from neoxrt.bench.results import add_results_flag

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 400, "maxLength": 420}},
          "required": ["text"], "additionalProperties": False}
PROMPT = "The state of the Union is"
ROOT = Path("artifacts/bench-structured")
OUT = Path("bench-results")


def artifact(shape: str) -> Path:
    from neoxrt.bench.shapes import exported, shape_checkpoint

    if shape == "pythia-14m-sotu":
        from neoxrt.assets import DEFAULT_MODEL_DIR

        return exported(DEFAULT_MODEL_DIR, ROOT / shape, {})
    return exported(shape_checkpoint(shape, ROOT), ROOT / f"{shape}-art", {})


def batch1(gen, tokens: int, constrained: bool, seed: int) -> tuple[float, int]:
    """(seconds, tokens) of one generation at temperature 1."""
    extra = {"structured_outputs": {"json": SCHEMA}} if constrained else {"ignore_eos": True}
    start = time.perf_counter()
    result = gen.generate(PROMPT, max_new_tokens=tokens, temperature=1.0, seed=seed, **extra)
    return time.perf_counter() - start, len(result.ids[0])


def concurrent(gen, tokens: int, constrained: bool, seed: int, clients: int = 16) -> tuple[float, int]:
    """(seconds, tokens) of `clients` requests submitted together and run to the end in one batch."""
    from neoxrt.runtime.scheduler import Scheduler

    sched, count = Scheduler(gen, max_batch=clients, prefill_tokens=clients * 16), [0]
    extra = {"structured_outputs": {"json": SCHEMA}} if constrained else {"ignore_eos": True}

    def on_event(event):
        count[0] += 1

    start = time.perf_counter()
    for k in range(clients):
        sched.submit(PROMPT, on_event, max_new_tokens=tokens, temperature=1.0, seed=seed * 100 + k, **extra)
    while sched.stats.active or sched.stats.queued:
        sched.step()
    return time.perf_counter() - start, count[0]


VARIANTS = ("unconstrained", "constrained")


class LoopThreadCost:
    """Seconds the generation loop's own thread spends in the constraint (checking a choice, masking the logits,
    advancing): patched around `masked` where the loops call it (runtime/sampling.py) and `Constraint.accepts` and
    `Constraint.advance`. On a loaded machine the wall-clock ratio swings by more than the constraint costs; this is
    the cost itself, measured in the same runs."""

    def __init__(self):
        from neoxrt.runtime import sampling, structured

        self.seconds = 0.0
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in
                      ((sampling, "masked"), (structured.Constraint, "accepts"), (structured.Constraint, "advance"))]

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper

    def __enter__(self):
        for owner, name, fn in self.saved:
            setattr(owner, name, self._timed(fn))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)


def measure(shape: str, rounds: int, tokens: int, threads: int | None) -> dict:
    from neoxrt.runtime import Generator

    gen = Generator.from_artifacts(artifact(shape), threads=threads)
    gen.generate(PROMPT, max_new_tokens=4, structured_outputs={"json": SCHEMA})  # compile once (cached), warm up
    rows = {}
    for name, run in (("batch 1", batch1), ("16 concurrent", concurrent)):
        per_token = {v: [] for v in VARIANTS}
        counts = {v: [] for v in VARIANTS}
        loop_cost = {v: [] for v in VARIANTS[1:]}
        for r in range(rounds):  # interleaved: each variant once per round
            for variant in VARIANTS:
                with LoopThreadCost() as cost:
                    seconds, n = run(gen, tokens, variant != VARIANTS[0], r)
                per_token[variant].append(seconds / n)
                counts[variant].append(n)
                if variant != VARIANTS[0]:
                    loop_cost[variant].append(cost.seconds / n)
        plain = statistics.median(per_token[VARIANTS[0]])
        rows[name] = {"ms_per_token": {v: round(1e3 * statistics.median(per_token[v]), 3) for v in VARIANTS},
                      "ratio": {v: round(statistics.median(per_token[v]) / plain, 3) for v in VARIANTS[1:]},
                      # 1 + the constraint's own loop-thread time per token over the unconstrained time per token
                      "loop_thread_ms_per_token": {v: round(1e3 * statistics.median(loop_cost[v]), 4) for v in VARIANTS[1:]},
                      "cost_ratio": {v: round(1 + statistics.median(loop_cost[v]) / plain, 3) for v in VARIANTS[1:]},
                      "tokens": counts}
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=["pythia-14m-sotu", "pythia-70m", "pythia-160m"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    add_results_flag(parser, "structured")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    shown = sys.argv[1:] if argv is None else argv
    result = {"command": " ".join(["python -m neoxrt.bench.structured", *shown]), "commit": commit,
              "cpu": platform.processor() or platform.machine(), "note": "medians of interleaved rounds; a shared "
              "machine's timings (other work running), ratios more telling than absolute times", "shapes": {}}
    for shape in args.shape or ["pythia-14m-sotu", "pythia-70m"]:
        result["shapes"][shape] = measure(shape, args.rounds, args.tokens, args.threads)
        print(json.dumps({shape: result["shapes"][shape]}))
    OUT.mkdir(exist_ok=True)
    (OUT / "structured.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Structured outputs: per-token cost ({result['command']}, commit {commit}, {result['cpu']})", "",
             result["note"], "", "| shape | batch | " + " | ".join(f"{v} ms/token" for v in VARIANTS) +
             " | ratio | loop-thread cost ratio |", "|---" * (len(VARIANTS) + 4) + "|"]
    for shape, rows in result["shapes"].items():
        for name, row in rows.items():
            cells = [str(row["ms_per_token"][v]) for v in VARIANTS] + [str(row["ratio"][v]) for v in VARIANTS[1:]] + \
                [str(row["cost_ratio"][v]) for v in VARIANTS[1:]]
            lines.append(f"| {shape} | {name} | " + " | ".join(cells) + " |")
    (OUT / "structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.results:
        publish(result, args.results)
    return 0


COLUMNS = ["shape", "batch", "unconstrained ms/token", "constrained ms/token", "ratio", "loop-thread cost ratio"]


def publish(result: dict, name: str, measured: dict | None = None) -> Path:
    """`result` (what main writes to bench-results/structured.json) as docs/results/NAME.json; the unconstrained
    column is the reference, the 16-concurrent rows the README's headline."""
    from neoxrt.bench.results import write_result

    rows, headline = [], []
    for shape, by_batch in result["shapes"].items():
        for batch, row in by_batch.items():
            ms, ratio = row["ms_per_token"], row["ratio"]["constrained"]
            rows.append([shape, batch, ms["unconstrained"], ms["constrained"], ratio, row["cost_ratio"]["constrained"]])
            if batch == "16 concurrent":
                headline.append({"measure": f"structured outputs (JSON schema), {shape}, {batch}: ms/token",
                                 "neoxrt": f"{ms['constrained']} constrained", "reference": f"{ms['unconstrained']} "
                                 "unconstrained", "ratio": ratio})
    return write_result(name, "Structured outputs: per-token cost, constrained against unconstrained", COLUMNS, rows,
                        command=result["command"], reference="the unconstrained column, same model, rounds interleaved "
                        "in one process", headline=headline, notes="Ratio: median constrained / median unconstrained "
                        "time per token; loop-thread cost ratio: 1 + the constraint's own time on the loop's thread per "
                        "token / the unconstrained time per token (less swayed by load).", measured=measured)


if __name__ == "__main__":
    raise SystemExit(main())
