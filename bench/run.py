"""`make bench` / `neoxrt bench`: neoxrt against transformers (eager, sdpa) and Optimum + ONNX Runtime, same
machine, same inputs, threads pinned equal, each engine in its own process; ratios against each anchor and
against the weight-bandwidth floor. Writes bench-results/bench.{md,json,png}; `--results` also docs/results/bench.json
(the anchors' rows as the reference; docs/benchmarks.md renders it)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from neoxrt.bench.results import add_results_flag
from neoxrt.bench.shapes import calibrated, exported, shape_checkpoint

ENGINES = ["neoxrt-ort-decomposed", "neoxrt-ort-fused", "neoxrt-ort-fused-last", "neoxrt-ort-fused-static-last",
           "neoxrt-ort-int8", "neoxrt-ort-int8-weights",
           "neoxrt-ort-int8-dynamic", "neoxrt-ort-int4-weights", "neoxrt-ort-fused-screened",
           "neoxrt-ort-fused-last-screened", "neoxrt-spec-int8", "neoxrt-spec-int4",
           "neoxrt-spec-lookup", "optimum-ort", "optimum-ort-int8-dynamic", "hf-sdpa", "hf-eager"]
INT8_ENGINES = {"neoxrt-ort-int8", "neoxrt-ort-int8-weights", "neoxrt-ort-int8-dynamic", "optimum-ort-int8-dynamic"}
# 4-bit blocks of 32 with a float scale (4.5 bits per weight); the LM head's 8-bit blocks make the floor a lower bound
INT4_ENGINES = {"neoxrt-ort-int4-weights"}
# neoxrt-ort-<variant> -> (export artifact name, its ExportOptions, calibration options or None)
NEOXRT_VARIANTS = {"decomposed": ("decomposed", {"attention": "decomposed"}, None),
                   "fused": ("fused", {}, None),
                   "fused-last": ("fused-last", {"logits": "last"}, None),
                   "fused-static-last": ("fused-static-last", {"logits": "last", "kv_cache": "static"}, None),
                   "fused-screened": ("fused-screened", {"lm_head": "screened"}, None),
                   "fused-last-screened": ("fused-last-screened", {"logits": "last", "lm_head": "screened"}, None),
                   "int8": ("fused", {}, {}),
                   "int8-weights": ("fused", {}, {"weights_only": True}),
                   "int8-dynamic": ("fused", {}, {"method": "ort-dynamic"}),
                   "int4-weights": ("fused", {}, {"weights_only": True, "bits": 4, "method": "rtn"})}
# speculative decoding on the fp32 fused export: neoxrt-spec-<name> -> (draft variant or None, generate() keywords)
SPEC_ENGINES = {"int8": ("int8-weights", {}), "int8-k4": ("int8-weights", {"num_draft_tokens": 4}),
                "int8-k8": ("int8-weights", {"num_draft_tokens": 8}), "int8-k12": ("int8-weights", {"num_draft_tokens": 12}),
                "int8-dynamic": ("int8-dynamic", {}), "int4": ("int4-weights", {}),
                "lookup": (None, {"prompt_lookup_tokens": 5})}
# neoxrt-spec-<name>-screened (not in the default list): the target is the fp32 export with the screened LM
# head (greedy tokens = fp32's); measured no faster than the exact target on random weights (docs/benchmarks.md)
SCREENED_SPEC = "-screened"
FULL_CASES = [(1, 128), (8, 128), (1, 1024), (8, 1024)]


def machine_facts() -> dict:
    cpu, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("onnxruntime", "torch", "transformers", "optimum", "optimum-onnx", "numpy", "onnx"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # a missing anchor library is reported, not fatal
            versions[name] = "not installed"
    return {"cpu": cpu, "isa": sorted(set(flags)), "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": versions}


def read_bandwidth(threads: int = 2, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: `threads` threads each summing its own array far larger than the caches."""
    arrays = [np.ones(mib * 2**20 // 4, np.float32) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(a,)) for a in arrays]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, sum(a.nbytes for a in arrays) / (time.perf_counter() - start) / 1e9)
    return best


def decode_weight_bytes(config: dict, bytes_per_weight: float = 4.0, head_bytes_per_weight: float | None = None) -> float:
    """Weights read per decoded token: every layer's matrices and the LM head (the embedding is a gather);
    `head_bytes_per_weight`: the LM head's, when it differs (the screened head reads its INT8 copy)."""
    h, i, layers, v = config["hidden_size"], config["intermediate_size"], config["num_layers"], config["vocab_size"]
    per_layer = 3 * h * h + h * h + 2 * h * i
    head = bytes_per_weight if head_bytes_per_weight is None else head_bytes_per_weight
    return layers * per_layer * bytes_per_weight + v * h * head


def run_engine(spec: dict) -> tuple[dict, float]:
    """One engine in its own process; returns its timings and its own peak RSS."""
    done = subprocess.run([sys.executable, "-m", "neoxrt.bench.engines", json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"engine {spec['engine']} failed (exit {done.returncode})")
    result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    return result["cases"], result["peak_rss_mib"]


def neoxrt_artifact(name: str, checkpoint: Path, variant: str, root: Path) -> Path:
    """Our artifact for a bench variant, exported (and calibrated) once under `root`."""
    export_name, export_options, calibration = NEOXRT_VARIANTS[variant]
    source = exported(checkpoint, root / f"{name}-{export_name}", export_options)
    return source if calibration is None else calibrated(source, root / f"{name}-{variant}", calibration)


def merge_rounds(rounds: list[dict]) -> dict:
    """Pool several rounds of one engine: per case, all block medians and prompt runs; the largest peak RSS."""
    cases = {}
    for r in rounds:
        for key, case in r["cases"].items():
            into = cases.setdefault(key, {**case, "prompt_ms": [], "decode_ms_per_token": []})
            into["prompt_ms"] += case["prompt_ms"]
            into["decode_ms_per_token"] += case["decode_ms_per_token"]
            if "spec_stats" in case:
                pooled = into.setdefault("spec_pooled", {"rounds": 0, "drafted": 0, "accepted": 0})
                for k in pooled:
                    pooled[k] += case["spec_stats"][k]
    return {"cases": cases, "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds)}


def bench_model(name: str, checkpoint: Path, cases, engines, threads: int, root: Path, log, rounds: int = 1) -> dict:
    """Every engine once per round, rounds interleaved (A B C, A B C) so a slow spell on the shared machine
    does not land on one engine only; results pooled across rounds."""
    from neoxrt.model import read_config

    config = read_config(checkpoint).to_dict()
    runs: dict[str, list] = {e: [] for e in engines}
    for round_ in range(rounds):
        for engine in engines:
            runs[engine].append(_run_one(name, checkpoint, config, cases, engine, threads, root, log, round_))
    return {"config": config, "engines": {e: merge_rounds(r) for e, r in runs.items()}}


def _run_one(name, checkpoint, config, cases, engine, threads, root, log, round_) -> dict:
    spec = {"engine": engine, "checkpoint": str(checkpoint), "threads": threads, "vocab": config["vocab_size"],
            "cases": [{"batch": b, "context": c, "runs": 5, "block": 4, "prompt_runs": 5 if (b, c) == (1, 128) else 1}
                      for b, c in cases]}
    if engine.startswith("neoxrt-ort-"):
        artifact = neoxrt_artifact(name, checkpoint, engine.removeprefix("neoxrt-ort-"), root)
        spec.update(engine="neoxrt-ort", artifact=str(artifact))
    elif engine.startswith("neoxrt-spec-"):  # tokens arrive in bursts: time whole blocks of 16 tokens
        spec_name = engine.removeprefix("neoxrt-spec-")
        target = "fused-screened" if spec_name.endswith(SCREENED_SPEC) else "fused"
        draft, kwargs = SPEC_ENGINES[spec_name.removesuffix(SCREENED_SPEC)]
        spec.update(engine="neoxrt-ort", artifact=str(neoxrt_artifact(name, checkpoint, target, root)),
                    draft=str(neoxrt_artifact(name, checkpoint, draft, root)) if draft else None, generate=kwargs,
                    mean_blocks=True)
        for case in spec["cases"]:
            case.update(runs=4, block=16)
    elif engine.startswith("optimum-ort"):
        spec["artifact"] = str(root / f"{name}-optimum")
        if engine == "optimum-ort-int8-dynamic":
            spec["int8_artifact"] = str(root / f"{name}-optimum-int8-dynamic")
    log(f"  {name}: {engine} (round {round_ + 1}) ...")
    results, rss = run_engine(spec)
    return {"cases": results, "peak_rss_mib": rss}


def summarise(result: dict, bandwidth: float) -> list[dict]:
    lines = []
    for model, data in result["models"].items():
        for engine, row in data["engines"].items():
            bytes_per_weight = 1.0 if engine in INT8_ENGINES else 0.5625 if engine in INT4_ENGINES else 4.0
            precision = ("int8" if engine in INT8_ENGINES else "int4" if engine in INT4_ENGINES
                         else "fp32-speculative" if "-spec-" in engine else "fp32")
            head = 1.0 if engine.endswith("screened") else None  # its INT8 copy (and a few fp32 rows)
            floor_ms = decode_weight_bytes(data["config"], bytes_per_weight, head) / (bandwidth * 1e9) * 1e3
            for key, case in row["cases"].items():
                decode = float(np.median(case["decode_ms_per_token"]))
                lines.append({
                    "model": model, "engine": engine, "precision": precision,
                    "case": key, "batch": case["batch"], "context": case["context"],
                    "prompt_ms": float(np.median(case["prompt_ms"])),
                    "decode_ms": decode,
                    "decode_spread_ms": [min(case["decode_ms_per_token"]), max(case["decode_ms_per_token"])],
                    "tokens_per_s": case["batch"] * 1e3 / decode,
                    "peak_rss_mib": row["peak_rss_mib"],
                    "floor_ms": floor_ms if case["batch"] == 1 else None,
                    "speculative": _acceptance(case.get("spec_pooled")),
                })
    return lines


def _acceptance(stats: dict | None) -> dict | None:
    """Acceptance rate (accepted / drafted guesses) and tokens per verify step (batch 1: accepted + 1 per round)."""
    if not stats or not stats["rounds"]:
        return None
    return {**stats, "acceptance": stats["accepted"] / max(stats["drafted"], 1),
            "tokens_per_verify": (stats["accepted"] + stats["rounds"]) / stats["rounds"]}


def _find(lines, model, engine, case):
    return next((x for x in lines if x["model"] == model and x["engine"] == engine and x["case"] == case), None)


def targets(lines) -> list[dict]:
    """The issues' floors for the Pythia-160m shape, batch 1 (fp32 unless named INT8)."""
    m = "pythia-160m"
    best = min((x for x in lines if x["model"] == m and x["engine"].startswith("neoxrt") and x["case"] == "b1_c128"
                and x["precision"] == "fp32"), key=lambda x: x["decode_ms"], default=None)
    out = []
    if best is None:
        return out
    ours = best["engine"]
    opt, sdpa = _find(lines, m, "optimum-ort", "b1_c128"), _find(lines, m, "hf-sdpa", "b1_c128")

    def add(name, value, limit):
        out.append({"target": name, "value": round(value, 3), "limit": limit, "met": value <= limit})

    fastest_prompt = min((x for x in lines if x["model"] == m and x["engine"].startswith("neoxrt")
                          and x["case"] == "b1_c128" and x["precision"] == "fp32"), key=lambda x: x["prompt_ms"])
    if opt:
        add(f"decode {ours} / optimum-ort", best["decode_ms"] / opt["decode_ms"], 0.75)
        add(f"prompt(128) {fastest_prompt['engine']} / optimum-ort", fastest_prompt["prompt_ms"] / opt["prompt_ms"], 0.8)
    if sdpa:
        add(f"decode {ours} / hf-sdpa", best["decode_ms"] / sdpa["decode_ms"], 0.5)
    add(f"decode {ours} / weight-bandwidth floor", best["decode_ms"] / best["floor_ms"], 1.25)
    for engine in sorted({x["engine"] for x in lines if x["model"] == m and x["engine"].startswith("neoxrt")
                          and x["precision"] == "fp32"}):
        short, long = _find(lines, m, engine, "b1_c128"), _find(lines, m, engine, "b1_c1024")
        if short and long:
            add(f"decode at context 1024 / context 128 ({engine})", long["decode_ms"] / short["decode_ms"], 1.2)
    fp32 = _find(lines, m, "neoxrt-ort-fused", "b1_c128")
    for engine in ("neoxrt-ort-int8", "neoxrt-ort-int8-weights"):  # W8A8 (static ranges) and weights-only
        int8 = _find(lines, m, engine, "b1_c128")
        if int8 is None:
            continue
        for anchor, limit in (("optimum-ort-int8-dynamic", 0.6), ("neoxrt-ort-int8-dynamic", 1.0)):
            row = _find(lines, m, anchor, "b1_c128")
            if row:
                add(f"INT8 decode {engine} / {anchor}", int8["decode_ms"] / row["decode_ms"], limit)
                if anchor == "neoxrt-ort-int8-dynamic":  # the prompt too: a decode win must not hide a prompt loss
                    add(f"INT8 prompt(128) {engine} / {anchor}", int8["prompt_ms"] / row["prompt_ms"], limit)
        if fp32:
            add(f"INT8 decode {engine} / fp32 neoxrt-ort-fused (1.6x faster)", int8["decode_ms"] / fp32["decode_ms"],
                0.625)
    screened = _find(lines, m, "neoxrt-ort-fused-screened", "b1_c128")
    if screened and fp32:  # greedy tokens = fp32's, a quarter of the LM head's bytes
        add("decode neoxrt-ort-fused-screened / fp32 neoxrt-ort-fused", screened["decode_ms"] / fp32["decode_ms"], 1.0)
    spec_limits = (("neoxrt-spec-int8", 0.55), ("neoxrt-spec-int4", 0.55), ("neoxrt-spec-lookup", 1.05),
                   ("neoxrt-spec-int8-screened", 0.55))
    for engine, limit in spec_limits:  # fp32-exact tokens
        row = _find(lines, m, engine, "b1_c128")
        if row and fp32:
            add(f"speculative decode {engine} / fp32 neoxrt-ort-fused", row["decode_ms"] / fp32["decode_ms"], limit)
    return out


def _ratio(row: dict, anchor: dict | None) -> str:
    return f"{row['decode_ms'] / anchor['decode_ms']:.2f}x" if anchor else "-"


def markdown(result: dict, lines: list[dict]) -> str:
    facts = result["machine"]
    md = ["# neoxrt bench", "",
          f"- CPU: {facts['cpu']} ({facts['cores']} cores visible, {result['threads']} threads for every engine); "
          f"ISA: {' '.join(facts['isa'])}",
          f"- read bandwidth (numpy sum, {result['threads']} threads): {result['bandwidth_gbs']:.1f} GB/s",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items()),
          "- each number: median over 5 blocks of 4 decode steps per round (spread = min..max of block medians); "
          f"prompt latency median of 5 runs at batch 1 / context 128, else 1 run per round; {result.get('rounds', 1)} "
          "round(s), engines interleaved", ""]
    for model in result["models"]:
        md += [f"## {model}", "",
               "| engine | case | prompt ms | decode ms/token (spread) | tokens/s | vs optimum | vs hf-sdpa | vs floor "
               "| peak RSS MiB |",
               "|---|---|---|---|---|---|---|---|---|"]
        for x in (y for y in lines if y["model"] == model):
            opt, sdpa = _find(lines, model, "optimum-ort", x["case"]), _find(lines, model, "hf-sdpa", x["case"])
            floor = f"{x['decode_ms'] / x['floor_ms']:.2f}x" if x["floor_ms"] else "-"
            md.append(f"| {x['engine']} | {x['case']} | {x['prompt_ms']:.1f} | {x['decode_ms']:.2f} "
                      f"({x['decode_spread_ms'][0]:.2f}..{x['decode_spread_ms'][1]:.2f}) | {x['tokens_per_s']:.1f} | "
                      f"{_ratio(x, opt)} | {_ratio(x, sdpa)} | {floor} | {x['peak_rss_mib']:.0f} |")
        for x in (y for y in lines if y["model"] == model and y["speculative"]):
            s = x["speculative"]
            md.append(f"\n{x['engine']} {x['case']}: {s['accepted']} of {s['drafted']} guesses accepted "
                      f"({s['acceptance']:.2f}), {s['tokens_per_verify']:.2f} tokens per verify step "
                      f"({s['rounds']} verify steps)")
        for precision in ("fp32", "int8", "int4"):
            floor_ms = next((x["floor_ms"] for x in lines if x["model"] == model and x["floor_ms"]
                             and x["precision"] == precision), None)
            if floor_ms:
                md += ["", f"Weight-bandwidth floor ({precision}, batch 1): {floor_ms:.2f} ms/token.", ""]
    if result["targets"]:
        md += ["## Targets (Pythia-160m shape, batch 1; fp32 unless INT8)", "", "| target | value | limit | met |",
               "|---|---|---|---|"]
        md += [f"| {t['target']} | {t['value']} | <= {t['limit']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    return "\n".join(md) + "\n"


def chart(lines: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [x for x in lines if x["case"] == "b1_c128"]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ax.barh([f"{x['model']} {x['engine']}" for x in rows], [x["decode_ms"] for x in rows])
    ax.set_xlabel("decode ms/token (batch 1, context 128)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from neoxrt import cli_types as t

    parser = t.OneLineParser(prog="neoxrt bench")
    parser.add_argument("--quick", action="store_true", help="Pythia-160m shape, batch 1, context 128 only")
    parser.add_argument("--threads", type=t.positive_int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--rounds", type=t.positive_int, default=1, help="run every engine this many times, interleaved")
    add_results_flag(parser, "bench")
    args = t.parse_args(parser, argv)
    if isinstance(args, int):
        return args
    from neoxrt.assets import DEFAULT_MODEL_DIR

    root = Path("artifacts/bench")
    root.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    models = {"pythia-160m": (shape_checkpoint("pythia-160m", root), [(1, 128)] if args.quick else FULL_CASES)}
    if not args.quick:
        models["pythia-70m"] = (shape_checkpoint("pythia-70m", root), [(1, 128)])
        models["trained-default-14m"] = (DEFAULT_MODEL_DIR, [(1, 128)])
    result = {"machine": machine_facts(), "threads": args.threads, "rounds": args.rounds, "models": {}}
    result["bandwidth_gbs"] = read_bandwidth(args.threads)
    for name, (checkpoint, cases) in models.items():
        result["models"][name] = bench_model(name, checkpoint, cases, engines, args.threads, root, print, args.rounds)
    lines = summarise(result, result["bandwidth_gbs"])
    result["rows"] = lines
    result["targets"] = targets(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result, lines))
    chart(lines, out / "bench.png")
    print(markdown(result, lines))
    if args.results:
        publish(lines, result, args.results, " ".join(["neoxrt bench", *(sys.argv[1:] if argv is None else argv)]))
    return 0


ANCHORS = ("optimum-", "hf-")  # the engines that are the reference, not neoxrt


def publish(lines: list[dict], result: dict, name: str, command: str) -> None:
    """docs/results/NAME.json: neoxrt's rows, the anchors' rows (transformers, Optimum) as the reference; the headline:
    the fastest fp32 neoxrt decode at batch 1, context 128 of each model against each anchor."""
    from neoxrt.bench.results import write_result

    def cells(x):
        return [x["engine"], x["model"], x["case"], round(x["prompt_ms"], 1), round(x["decode_ms"], 2),
                round(x["tokens_per_s"], 1), round(x["decode_ms"] / x["floor_ms"], 2) if x["floor_ms"] else None,
                round(x["peak_rss_mib"])]

    headline = []
    for model in result["models"]:
        best = min((x for x in lines if x["model"] == model and x["case"] == "b1_c128" and x["precision"] == "fp32"
                    and x["engine"].startswith("neoxrt")), key=lambda x: x["decode_ms"], default=None)
        for anchor in ("optimum-ort", "hf-sdpa"):
            ref = _find(lines, model, anchor, "b1_c128")
            if best and ref:
                headline.append({"measure": f"decode ms/token, {model}, batch 1, context 128, fp32",
                                 "neoxrt": f"{best['decode_ms']:.2f} ({best['engine']})",
                                 "reference": f"{ref['decode_ms']:.2f} ({anchor})",
                                 "ratio": round(best["decode_ms"] / ref["decode_ms"], 2)})
    write_result(name, "Decode and prompt speed against transformers and Optimum + ONNX Runtime",
                 ["engine", "model", "case", "prompt ms", "decode ms/token", "tokens/s", "vs floor", "peak RSS MiB"],
                 [cells(x) for x in lines if not x["engine"].startswith(ANCHORS)], command=command,
                 reference="transformers (eager, sdpa) and Optimum + ONNX Runtime in the same run, same threads",
                 reference_rows=[cells(x) for x in lines if x["engine"].startswith(ANCHORS)], headline=headline,
                 notes=f"{result['threads']} threads, {result['rounds']} round(s), engines interleaved; read bandwidth "
                 f"{result['bandwidth_gbs']:.1f} GB/s; vs floor: decode time over the weight-bandwidth floor (batch 1).")


if __name__ == "__main__":
    sys.exit(main())
