"""Two artifacts' decode speed, interleaved in one process (the A/B behind a graph change's numbers in
docs/benchmarks.md): per pass, each artifact streams `new` greedy tokens after the same random `context`-token prompt
(bench-llamacpp's timing: the mean gap after the first token), the order alternating between passes; the
median of the per-pass ratios B / A.

    python -m neoxrt.bench.ab ARTIFACT_A ARTIFACT_B [--passes 10] [--context 128] [--new 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from neoxrt.bench.llamacpp import time_neoxrt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from neoxrt.runtime import Generator

    gens = [Generator.from_artifacts(p, threads=args.threads, verify=False) for p in (args.a, args.b)]
    vocab = min(int(g.config["vocab_size"]) for g in gens)
    prompt = np.random.default_rng(0).integers(2, vocab, args.context)
    for gen in gens:  # warm-up
        time_neoxrt(gen, prompt, 4)
    rows = []
    for p in range(args.passes):
        order = [0, 1] if p % 2 == 0 else [1, 0]
        ms = {i: time_neoxrt(gens[i], prompt, args.new)[1] for i in order}
        rows.append((ms[0], ms[1]))
    rows = np.array(rows)
    print(f"decode ms/token, median of {args.passes} passes: A {np.median(rows[:, 0]):.3f}, B {np.median(rows[:, 1]):.3f}; "
          f"B / A {np.median(rows[:, 1] / rows[:, 0]):.3f} (median of per-pass ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
