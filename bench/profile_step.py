"""Where one decode step's time goes: `python -m neoxrt.bench.profile_step ARTIFACT [--context 128] [--steps 64]`.

Two passes of greedy `Generator.stream` (batch 1, `context`-token random prompt, `steps` tokens): a plain one
gives the wall time per token and the wall time of `run_with_iobinding` inside it (the rest is our Python:
binding inputs, cache handling, the logits, sampling); a second one with ONNX Runtime's profiler on gives the
kernel time (sum of the nodes' `*_kernel_time`) against the profiler's own `model_run` per step. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _decode(gen, prompt: list[int], steps: int) -> tuple[list[float], list[float]]:
    """(gap per token ms, run_with_iobinding wall ms per decode step), decode steps after the first only."""
    sess = gen.session.sess
    runs: list[float] = []
    original = sess.run_with_iobinding

    def timed(binding, *args):
        start = time.perf_counter()
        out = original(binding, *args)
        runs.append((time.perf_counter() - start) * 1e3)
        return out

    sess.run_with_iobinding = timed
    try:
        stamps = [time.perf_counter()]
        for _ in gen.stream([prompt], max_new_tokens=steps + 1, ignore_eos=True):
            stamps.append(time.perf_counter())
    finally:
        del sess.run_with_iobinding
    gaps = list(np.diff(stamps[2:]) * 1e3)
    return gaps, runs[2:]  # runs[0] is the prompt, runs[1] the first decode step


def kernel_times(trace: Path, skip: int) -> tuple[list[float], list[float]]:
    """(model_run ms, kernel ms) per run of a profiler trace, the first `skip` runs left out."""
    events = json.loads(trace.read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    sums = []
    for ts, dur in runs:
        sums.append(sum(k["dur"] for k in kernels if ts <= k["ts"] <= ts + dur) / 1e3)
    return [d / 1e3 for _, d in runs][skip:], sums[skip:]


def profile(artifact: str, context: int, steps: int, threads: int) -> dict:
    import onnxruntime as ort

    from neoxrt.runtime import Generator
    from neoxrt.runtime.ort_session import OrtSession

    gen = Generator.from_artifacts(artifact, threads=threads, verify=False)
    vocab = gen.session.io_spec()[1][0].shape[-1]
    prompt = np.random.default_rng(0).integers(2, vocab, context).tolist()
    _decode(gen, prompt[:16], 4)  # warm-up
    gaps, runs = _decode(gen, prompt, steps)
    plain = gen.session
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "step")
        manifest = json.loads((Path(artifact) / "manifest.json").read_text())
        gen.session = OrtSession(plain.path, threads=threads, options=options,
                                 config=manifest.get("onnxruntime_session_config"))
        _decode(gen, prompt[:16], 4)
        _decode(gen, prompt, steps)
        trace = Path(gen.session.sess.end_profiling())
        # warm-up: prompt + 5 steps; measured: prompt + first step, then the decode steps
        model_runs, kernels = kernel_times(trace, 5 + 2)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"artifact": artifact, "context": context, "steps": steps, "token_gap_ms": med(gaps),
            "run_with_iobinding_ms": med(runs), "python_around_ms": med(gaps) - med(runs),
            "profiled_model_run_ms": med(model_runs), "profiled_kernel_ms": med(kernels),
            "kernel_share_of_model_run": med(kernels) / med(model_runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for artifact in args.artifacts:
        print(json.dumps(profile(artifact, args.context, args.steps, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
