"""One decode step of 16 rows at a given context, three ways of carrying the KV cache, interleaved in one process
(the measurement behind the scheduler's KV-cache pool, docs/serving.md):

    arrays   the dynamic export (`--kv-cache dynamic`) through `Session.run`: past in and present out as numpy arrays, the
             scheduler's portable path before the pool
    bound    the dynamic export with the cache bound by pointer in two ping-pong buffers (`OrtBoundDecoder`): no
             arrays cross into Python, but the graph's Concat still writes past + 1 into the other buffer
    pool     the static export (`--kv-cache static`) on the scheduler's `KVPool`: one buffer per cache tensor
             bound as both past and present, each row's token written at its own slot, in place (its
             GroupQueryAttention form where it applies: runtime/pool_graph.py); its slots filled first, as a
             serving pool's are (never-written slots read the kernel's cached zero page)

Per context, each way runs `--steps` steps after a warm-up, the order rotating between passes; the median step.
`--mixed` also times the pool with 15 rows at 64 tokens and one at the context (the pool pays the longest row's
width for every row).

    python -m neoxrt.bench.pool_step [--shape pythia-160m] [--contexts 64 512 1024] [--rows 16] [--passes 3]
                                     [--arrays-upto 1024]

The arrays way holds past, present and their copies at once: past `--arrays-upto` it is left out (at 2048 x 16 rows
the 160m shape's cache is 2.4 GB a copy). `--results` also writes docs/results/pool-step.json (the arrays way is the
reference; docs/serving.md renders it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from neoxrt.bench.results import add_results_flag, command_line, write_result


def _artifacts(shape: str, root: Path) -> tuple[Path, Path]:
    from neoxrt.bench.shapes import exported, shape_checkpoint

    ckpt = shape_checkpoint(shape, root)
    return (exported(ckpt, root / f"{shape}-fused", {"kv_cache": "dynamic"}),
            exported(ckpt, root / f"{shape}-fused-static", {"kv_cache": "static"}))


def _time(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _arrays_step(gen, rows: int, context: int):
    from neoxrt import contract as io

    s = gen.session
    spec = {x.name: x for x in s.io_spec()[0]}[io.past_key(0)]
    _, heads, _, dim = spec.shape
    past = {n: np.zeros((rows, heads, context, dim), np.float32)
            for i in range(s.num_layers) for n in (io.past_key(i), io.past_value(i))}
    feeds = {io.INPUT_IDS: np.full((rows, 1), 7, np.int64), io.ATTENTION_MASK: np.ones((rows, context + 1), np.int64),
             io.POSITION_IDS: np.full((rows, 1), context, np.int64), **past}

    def step():
        out = s.run(feeds)
        for i in range(s.num_layers):  # the next step's past is this step's present, as the scheduler carries it
            feeds[io.past_key(i)] = out[io.present_key(i)][:, :, 1:]
            feeds[io.past_value(i)] = out[io.present_value(i)][:, :, 1:]
    return step


def _bound_step(gen, rows: int, context: int):
    from neoxrt.runtime.ort_session import OrtBoundDecoder

    dec = OrtBoundDecoder(gen.session, rows, context + 2)
    ids, pos = np.full((rows, 1), 7, np.int64), np.full((rows, 1), context, np.int64)
    mask = np.ones((rows, context + 1), np.int64)

    def step():
        dec.past_len = context
        dec.step(ids, mask, pos)
    return step


def _pool_step(gen, rows: int, lengths: list[int]):
    from neoxrt.runtime.kv_pool import KVPool

    width = max(lengths) + 1
    pool = KVPool(gen.session, max_rows=rows, capacity_tokens=rows * width)
    for j, n in enumerate(lengths):
        pool.add(j, width)
        pool.set_length(j, n)  # as if its n tokens were written
    for flat in pool.flat:  # and written they are: slots never written read the kernel's zero page, which is cached
        flat.fill(0.01)  # (a serving pool's slots hold earlier rows' keys and values)
    ids = np.full((rows, 1), 7, np.int64)

    def step():
        pool.run(list(range(rows)), ids, advance=False)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-160m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1024])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed", action="store_true")
    parser.add_argument("--arrays-upto", type=int, default=1024)
    parser.add_argument("--root", type=Path, default=Path(".cache/bench-pool"))
    add_results_flag(parser, "pool-step")
    args = parser.parse_args(argv)
    from neoxrt.runtime import Generator

    dynamic, static = _artifacts(args.shape, args.root)
    gd = Generator.from_artifacts(dynamic, threads=args.threads, verify=False)
    gs = Generator.from_artifacts(static, threads=args.threads, verify=False)
    print(f"{args.shape}, {args.rows} rows, {args.threads} threads; decode step ms, median over {args.passes} passes "
          f"of the median of {args.steps} steps")
    print("| context | arrays | bound | pool | pool / arrays |" + (" pool mixed |" if args.mixed else ""))
    print("|---|---|---|---|---|" + ("---|" if args.mixed else ""))
    table = []
    for context in args.contexts:
        ways = {"bound": _bound_step(gd, args.rows, context), "pool": _pool_step(gs, args.rows, [context] * args.rows)}
        if context <= args.arrays_upto:
            ways["arrays"] = _arrays_step(gd, args.rows, context)
        if args.mixed:
            ways["mixed"] = _pool_step(gs, args.rows, [64] * (args.rows - 1) + [context])
        names = list(ways)
        runs: dict[str, list[float]] = {n: [] for n in names}
        for p in range(args.passes):
            for n in names[p % len(names):] + names[:p % len(names)]:
                runs[n].append(_time(ways[n], args.steps))
        ms = {n: float(np.median(v)) for n, v in runs.items()}
        arrays = f"{ms['arrays']:.1f} | {ms['bound']:.1f} | {ms['pool']:.1f} | {ms['pool'] / ms['arrays']:.2f}" \
            if "arrays" in ms else f"- | {ms['bound']:.1f} | {ms['pool']:.1f} | -"
        line = f"| {context} | {arrays} |"
        print(line + (f" {ms['mixed']:.1f} |" if args.mixed else ""), flush=True)
        table.append([context] + [round(ms[n], 1) if n in ms else None for n in ("arrays", "bound", "pool")] +
                     [round(ms["pool"] / ms["arrays"], 2) if "arrays" in ms else None] +
                     ([round(ms["mixed"], 1)] if args.mixed else []))
        del ways
    if args.results:
        write_result(args.results, f"One decode step of {args.rows} rows, three ways of carrying the KV cache",
                     ["context", "arrays ms", "bound ms", "pool ms", "pool / arrays"] +
                     ([f"pool, {args.rows - 1} rows at 64 + 1 at the context, ms"] if args.mixed else []), table,
                     command=command_line("neoxrt.bench.pool_step", argv), reference="the arrays way (the portable "
                     "path) in the same process, ways interleaved pass by pass", notes=f"{args.shape} shape, "
                     f"{args.threads} threads; median over {args.passes} passes of the median of {args.steps} steps.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
