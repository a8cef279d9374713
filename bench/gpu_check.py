"""`make gpu-check`: the GPU half of the TensorRT work, as one script for a machine with an NVIDIA GPU and
TensorRT. Writes reports/gpu/ (summary.md, summary.json, one compare report per engine).

1. export the default model (fp16 fused, fp16 fused with the static KV cache, fp16 plugin) and calibrate INT8
   (Q/DQ) from its fp32 export;
2. build the FP16, static-cache FP16 (decode steps replayed from CUDA graphs), INT8 and plugin engines
   (timing cache reused between them);
3. generate with each engine and write the accuracy report against PyTorch (neoxrt compare);
4. time per-token decode latency (batch 1, context 128) of each engine against PyTorch eager and SDPA on
   the same GPU;
5. check the plugin's Triton kernel on CUDA against the reference and time it against
   torch.nn.functional.scaled_dot_product_attention for decode (batch 8, context 2048, fp16), alone and
   with the cache concatenation the portable contract implies.
Without TensorRT or a GPU it exits 2 with one line saying which is missing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from neoxrt.errors import NeoxrtError

ROOT, REPORTS = Path("artifacts/gpu"), Path("reports/gpu")


def _prepare(log) -> dict:
    from neoxrt.assets import DEFAULT_MODEL_DIR
    from neoxrt.calibration.calibrate import calibrate_artifact
    from neoxrt.calibration.options import CalibrationOptions
    from neoxrt.export.engine import BuildOptions, build_engine_artifact
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import ExportOptions

    quiet = dict(force=True, log=lambda *_: None)
    export_checkpoint(DEFAULT_MODEL_DIR, ROOT / "fp32", ExportOptions(), **quiet)
    export_checkpoint(DEFAULT_MODEL_DIR, ROOT / "fp16", ExportOptions(dtype="fp16"), **quiet)
    export_checkpoint(DEFAULT_MODEL_DIR, ROOT / "static-fp16", ExportOptions(dtype="fp16", kv_cache="static"), **quiet)
    export_checkpoint(DEFAULT_MODEL_DIR, ROOT / "plugin-fp16", ExportOptions(dtype="fp16", attention="plugin"), **quiet)
    calibrate_artifact(ROOT / "fp32", ROOT / "int8", CalibrationOptions(), progress=False, **quiet)
    engines = {}
    for name, source, plugin in (("fp16", "fp16", False), ("static-fp16", "static-fp16", False), ("int8", "int8", False),
                                 ("plugin-fp16", "plugin-fp16", True)):
        options = BuildOptions(max_batch=8, max_context=1024, timing_cache=ROOT / "timing.cache", plugin=plugin)
        start = time.perf_counter()
        build_engine_artifact(ROOT / source, ROOT / f"engine-{name}", options, force=True, log=log)
        engines[name] = {"path": ROOT / f"engine-{name}", "build_s": time.perf_counter() - start}
    return engines


def _decode_ms(run, prompt, new_tokens: int = 33) -> float:
    stamps = run(prompt, new_tokens)
    return float(np.median(np.diff(stamps[2:])) * 1e3)


def _ours(path):
    from neoxrt.runtime import Generator

    gen = Generator.from_artifacts(path)

    def run(prompt, new_tokens):
        stamps = [time.perf_counter()]
        for _ in gen.stream(prompt.tolist(), max_new_tokens=new_tokens, ignore_eos=True):
            stamps.append(time.perf_counter())
        return stamps

    return run


def _torch(attn: str):
    import torch
    from transformers import GPTNeoXForCausalLM

    from neoxrt.assets import DEFAULT_MODEL_DIR
    from neoxrt.bench.engines import hf_like

    model = GPTNeoXForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float16, attn_implementation=attn).cuda().eval()
    return hf_like(model, torch, "cuda", torch.cuda.synchronize)


def _kernel_vs_sdpa() -> dict:
    import torch

    from neoxrt.export.plugin_kernel import attention
    from neoxrt.export.plugin_ref import gpt_neox_attention

    b, h, d, r, past = 8, 12, 64, 16, 2047
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b, 1, 3 * h * d, device="cuda", dtype=torch.float16, generator=g)
    angles = torch.rand(b, 1, r, device="cuda", generator=g)
    cos, sin = angles.cos(), angles.sin()
    mask = torch.ones(b, past + 1, dtype=torch.int32, device="cuda")
    pk = torch.randn(b, h, past, d, device="cuda", dtype=torch.float16, generator=g)
    pv = torch.randn_like(pk)
    got = attention(qkv, cos, sin, mask, pk, pv, h, d, r, d**-0.5)
    ref = gpt_neox_attention(*(x.float().cpu().numpy() if x.dtype != torch.int32 else x.cpu().numpy()
                               for x in (qkv, cos, sin, mask, pk, pv)), num_heads=h, head_size=d, scale=d**-0.5)
    err = max(float(np.abs(got[i].float().cpu().numpy() - ref[i]).max()) for i in range(3))
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16, generator=g)
    k_new = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16, generator=g)

    def timed(fn, reps=100):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return float(np.median(times))

    k_all, v_all = torch.cat([pk, k_new], 2), torch.cat([pv, k_new], 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "shape": f"batch {b}, heads {h}, head {d}, rotary {r}, context {past + 1}, fp16, decode",
        "max_abs_error_vs_reference": err,
        "plugin_kernel_us": timed(lambda: attention(qkv, cos, sin, mask, pk, pv, h, d, r, d**-0.5)),
        "sdpa_us": timed(lambda: sdpa(q, k_all, v_all)),
        "cat_plus_sdpa_us": timed(lambda: sdpa(q, torch.cat([pk, k_new], 2), torch.cat([pv, k_new], 2))),
    }


def main() -> int:
    from neoxrt import tensorrt_api
    from neoxrt.assets import DEFAULT_MODEL_DIR
    from neoxrt.report.compare import CompareOptions, run_compare
    from neoxrt.report.render import write_report

    try:
        facts = tensorrt_api.facts()
    except NeoxrtError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    print(f"gpu-check on {facts['gpu']} (sm {facts['compute_capability']}), TensorRT {facts['tensorrt']}")
    engines = _prepare(print)
    prompt = np.random.default_rng(0).integers(2, 50000, (1, 128))
    summary = {"machine": facts, "engines": {}, "decode_ms_per_token_b1_c128": {}}
    for name, engine in engines.items():
        report = run_compare(engine["path"], DEFAULT_MODEL_DIR, CompareOptions(progress=False))
        write_report(report, REPORTS / name)
        from neoxrt.runtime import Generator

        text = Generator.from_artifacts(engine["path"]).generate(["The state of the Union is"], max_new_tokens=24).text[0]
        summary["engines"][name] = {"build_s": round(engine["build_s"], 1), "passed": report["passed"],
                                    "checks": {c["name"]: c["value"] for c in report["checks"]}, "sample": text}
        summary["decode_ms_per_token_b1_c128"][f"neoxrt-tensorrt-{name}"] = _decode_ms(_ours(engine["path"]), prompt)
    for attn in ("eager", "sdpa"):
        summary["decode_ms_per_token_b1_c128"][f"torch-{attn}-fp16"] = _decode_ms(_torch(attn), prompt)
    summary["plugin_kernel"] = _kernel_vs_sdpa()
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# gpu-check: {facts['gpu']} (sm {facts['compute_capability']}), TensorRT {facts['tensorrt']}", "",
             "| engine | build s | accuracy report | sample |", "|---|---|---|---|"]
    lines += [f"| {n} | {e['build_s']} | {'PASS' if e['passed'] else 'FAIL'} | {e['sample'][:60]!r} |"
              for n, e in summary["engines"].items()]
    lines += ["", "| decode, batch 1, context 128 | ms/token |", "|---|---|"]
    lines += [f"| {n} | {v:.3f} |" for n, v in summary["decode_ms_per_token_b1_c128"].items()]
    k = summary["plugin_kernel"]
    lines += ["", f"Plugin kernel ({k['shape']}): {k['plugin_kernel_us']:.1f} us; SDPA {k['sdpa_us']:.1f} us; "
              f"cat + SDPA {k['cat_plus_sdpa_us']:.1f} us; max abs error {k['max_abs_error_vs_reference']:.2e}"]
    (REPORTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(e["passed"] for e in summary["engines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
