"""A prompt chunk beside decoding rows on the KV-cache pool's packed form: one run carrying both (what the
scheduler's step does there, `Scheduler._one_run`) against the chunk's run and then a decode run (its step
elsewhere), interleaved in one process (docs/serving.md).

One row holds a prompt at `--past` tokens and computes a chunk of each `--chunks` length; `--rows` more rows decode
at each `--contexts` length. The pool's slots are filled first, as a serving pool's are.

    python -m neoxrt.bench.one_run [--shape pythia-160m] [--contexts 100 800] [--chunks 8 16 32 64 128 256]
                                   [--rows 8] [--past 512] [--passes 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-160m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 800])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path(".cache/bench-pool"))
    args = parser.parse_args(argv)
    from neoxrt import contract as io
    from neoxrt.bench.shapes import exported, shape_checkpoint
    from neoxrt.runtime.kv_pool import KVPool
    from neoxrt.runtime.ort_session import OrtSession

    static = exported(shape_checkpoint(args.shape, args.root), args.root / f"{args.shape}-fused-static",
                      {"kv_cache": "static"})
    rows = args.rows + 1
    width = max(args.past, *args.contexts) + max(args.chunks) + 1
    pool = KVPool(OrtSession(static / io.MODEL_FILE, threads=args.threads), max_rows=rows,
                  capacity_tokens=rows * width)
    if not pool.packed:
        print(f"the pool runs its {pool.form} form here (the packed form needs ONNX Runtime >= 1.32 and onnx): "
              "nothing to compare", file=sys.stderr)
        return 2
    for j in range(rows):
        pool.add(j, width)
    pool.set_length(0, width - 1)
    for flat in pool.flat:
        flat.fill(0.01)
    rng = np.random.default_rng(0)
    print(f"{args.shape}, a chunk after {args.past} tokens beside {args.rows} decoding rows, {args.threads} threads; "
          f"ms, median of {args.passes} alternating passes")
    print("| decoding rows' context | chunk | chunk run + decode run | one run | one run / apart |")
    print("|---|---|---|---|---|")
    for context in args.contexts:
        for chunk in args.chunks:
            def apart(chunk=chunk):
                pool.run([0], rng.integers(0, 1000, (1, chunk)), advance=False, last=True)
                pool.run(list(range(rows)), rng.integers(0, 1000, (rows, 1)), np.array([0] + [1] * args.rows),
                         advance=False)

            def one(chunk=chunk):
                ids = np.zeros((rows, chunk), np.int64)
                ids[0] = rng.integers(0, 1000, chunk)
                pool.run(list(range(rows)), ids, np.array([chunk] + [1] * args.rows), advance=False, last=True)

            pool.set_length(0, args.past)
            for j in range(1, rows):
                pool.set_length(j, context)
            times: dict[str, list[float]] = {"apart": [], "one": []}
            for p in range(args.passes + 1):
                for name, step in (("apart", apart), ("one", one)) if p % 2 else (("one", one), ("apart", apart)):
                    t = time.perf_counter()
                    step()
                    if p:  # the first pass warms up
                        times[name].append(time.perf_counter() - t)
            a, o = (float(np.median(times[k])) * 1e3 for k in ("apart", "one"))
            print(f"| {context} | {chunk} | {a:.1f} | {o:.1f} | {o / a:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
