"""One benchmark engine per process: `python -m neoxrt.bench.engines ENGINE CHECKPOINT ARTIFACT_JSON` prints
JSON timings. Every engine runs greedy generation through its own generate() and records a timestamp per
produced token, so one call gives the prompt latency and per-token decode latencies.

Engines: neoxrt-ort (our export on ONNX Runtime; any flavour), hf-eager, hf-sdpa (transformers generate()),
optimum-ort (optimum's own export + ORTModelForCausalLM), optimum-ort-int8-dynamic (that export through
onnxruntime's quantize_dynamic)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _neoxrt(artifact: str, threads: int, draft: str | None = None, kwargs: dict | None = None):
    from neoxrt.runtime import Generator

    gen = Generator.from_artifacts(artifact, threads=threads, verify=False, draft=draft)

    def run(prompt: np.ndarray, new_tokens: int) -> list[float]:
        stamps = [time.perf_counter()]
        for event in gen.stream(prompt.tolist(), max_new_tokens=new_tokens, ignore_eos=True, **(kwargs or {})):
            if event.row == len(prompt) - 1:
                stamps.append(time.perf_counter())
        return stamps

    run.spec_stats = lambda: gen.spec_stats  # rounds / drafted / accepted of the last speculative generation
    return run


def hf_like(model, torch, device: str = "cpu", sync=None):
    """run(prompt, new_tokens) -> timestamps, over a transformers-style generate() (`sync` before each stamp)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamp(StoppingCriteria):
        def __init__(self, stamps):
            self.stamps = stamps

        def __call__(self, input_ids, scores, **kwargs):
            if sync is not None:
                sync()
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def run(prompt: np.ndarray, new_tokens: int) -> list[float]:
        ids = torch.tensor(prompt, device=device)
        stamps = [time.perf_counter()]
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([Stamp(stamps)]))
        return stamps

    return run


def _hf(checkpoint: str, attn: str, threads: int):
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.set_num_threads(threads)
    model = GPTNeoXForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation=attn).eval()
    return hf_like(model, torch)


def _optimum(checkpoint: str, threads: int, export_dir: str, int8_dir: str | None = None):
    """Optimum's own export (in `export_dir`) on ORTModelForCausalLM; with `int8_dir`, that export through
    quantize_dynamic (the usual recipe for INT8 on CPU with Optimum)."""
    import shutil
    from pathlib import Path

    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    fp32_dir = Path(export_dir)
    if not (fp32_dir / "model.onnx").is_file():
        ORTModelForCausalLM.from_pretrained(checkpoint, export=True).save_pretrained(fp32_dir)
    if int8_dir and not (Path(int8_dir) / "model.onnx").is_file():
        from neoxrt.calibration.calibrate import ort_dynamic

        shutil.copytree(fp32_dir, int8_dir, ignore=shutil.ignore_patterns("model.onnx*"))
        ort_dynamic(fp32_dir / "model.onnx", Path(int8_dir) / "model.onnx")
    model = ORTModelForCausalLM.from_pretrained(int8_dir or fp32_dir, session_options=options)
    return hf_like(model, torch)


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM; unlike ru_maxrss it does not inherit the parent's at fork)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    threads = spec["threads"]
    engine = spec["engine"]
    if engine == "neoxrt-ort":
        run = _neoxrt(spec["artifact"], threads, spec.get("draft"), spec.get("generate"))
    elif engine in ("hf-eager", "hf-sdpa"):
        run = _hf(spec["checkpoint"], engine[3:], threads)
    elif engine in ("optimum-ort", "optimum-ort-int8-dynamic"):
        run = _optimum(spec["checkpoint"], threads, spec["artifact"], spec.get("int8_artifact"))
    else:
        raise SystemExit(f"unknown engine {engine}")
    vocab = spec["vocab"]
    rng = np.random.default_rng(0)
    results = {}
    run(rng.integers(2, vocab, (1, 16)), 4)  # warm-up
    for case in spec["cases"]:
        batch, context, blocks, block = case["batch"], case["context"], case["runs"], case["block"]
        prompt = rng.integers(2, vocab, (batch, context))
        prompt_runs = []
        for _ in range(case["prompt_runs"]):
            stamps = run(prompt, 1)
            prompt_runs.append((stamps[1] - stamps[0]) * 1e3)
        stamps = run(prompt, 1 + blocks * block + 1)
        steps = np.diff(stamps[2:])  # decode steps only, after the first decode (warm-up of the decode shape)
        if spec.get("mean_blocks"):  # speculative: tokens come in bursts of up to K + 1, so a block or a window
            # that starts inside a round counts its tokens without its compute: every token after the prompt's
            # over the time from that token on (the first round's compute included), one value a run
            per_block = [float((stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1e3)]
        else:
            per_block = [float(np.median(steps[i * block:(i + 1) * block]) * 1e3) for i in range(blocks)]
        results[f"b{batch}_c{context}"] = {"prompt_ms": prompt_runs, "decode_ms_per_token": per_block,
                                           "batch": batch, "context": context}
        if getattr(run, "spec_stats", None) and run.spec_stats():  # the timed generation's acceptance
            results[f"b{batch}_c{context}"]["spec_stats"] = dict(run.spec_stats())
    print("RESULT " + json.dumps({"cases": results, "peak_rss_mib": peak_rss_mib()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
