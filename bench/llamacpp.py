"""`make bench-llamacpp` (not in CI): neoxrt against llama.cpp at equal precision, interleaved in one run.

llama.cpp is built from the source vendored in the llama-cpp-python sdist (llamacpp_build.sh, cached under
.cache/llama.cpp), the benchmark models are converted with its convert_hf_to_gguf.py (its gguf-py on
PYTHONPATH) and quantized with llama-quantize. Pairs: our fp32 (fused export, last-position logits) against
f32, and our fp32 with the screened LM head (greedy tokens = fp32's) against f32 again; INT8 weights-only
against q8_0, INT4 (awq, block 32) against q4_0. Artifacts are cached under artifacts/bench-llamacpp (re-made when
their manifest's graph_version is not the exporter's). Each pass times, for every pair, our
Generator.stream in this process (prompt = time to the first token after a `context`-token prompt; decode =
mean gap over `new` tokens after it) and then `llama-bench` (pp`context`; tg`new` at depth `context`), batch 1,
the same threads. Ratios neoxrt / llama.cpp are taken per pass; the table gives their median over passes.
Writes bench-results/llamacpp.{md,json}."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from neoxrt.bench.shapes import calibrated, exported, shape_checkpoint

HERE = Path(__file__).resolve().parent
ROOT = Path.cwd()
# neoxrt artifact name -> (llama.cpp type, calibration options, or None for an fp32 export)
PAIRS = {"fp32": ("f32", None),
         "fp32-screened": ("f32", None),
         "int8-weights": ("q8_0", {"weights_only": True}),
         "int4": ("q4_0", {"weights_only": True, "bits": 4, "block_size": 32, "method": "awq"})}
# the fp32 exports (last-position logits); fp32-screened: greedy tokens = fp32's, a quarter of the LM head's
# bytes per token (export/screen.py)
EXPORTS = {"fp32": {}, "fp32-screened": {"lm_head": "screened"}}
MODELS = {"pythia-160m": None, "trained-14m": "neoxrt/assets/pythia-14m-sotu"}


def model_checkpoint(name: str) -> Path:
    """The checkpoint of a benchmark model: the embedded trained one, or a random shape (any name
    bench/shapes.py knows) written once."""
    return Path(MODELS[name]) if MODELS.get(name) else shape_checkpoint(name, Path("artifacts/bench"))


def build(cache: Path) -> Path:
    """llama.cpp's binaries folder (built once, then reused)."""
    env = {**os.environ, "CACHE": str(cache), "PY": sys.executable}
    done = subprocess.run(["bash", str(HERE / "llamacpp_build.sh")], env=env, check=True, stdout=subprocess.PIPE,
                          text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def source(cache: Path) -> Path:
    return next(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))


def gguf(checkpoint: Path, name: str, kind: str, cache: Path, bins: Path, log) -> Path:
    """`checkpoint` as GGUF of type `kind` (f32 by convert_hf_to_gguf.py, the rest by llama-quantize)."""
    out = cache / "models" / f"{name}-{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if kind == "f32":
        src = source(cache)
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py") + os.pathsep + str(src)}
        log(f"converting {checkpoint} -> {out.name}")
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", "f32",
                        "--outfile", str(tmp)], env=env, check=True, stdout=subprocess.DEVNULL)
    else:
        f32 = gguf(checkpoint, name, "f32", cache, bins, log)
        log(f"quantizing {f32.name} -> {kind}")
        subprocess.run([str(bins / "llama-quantize"), str(f32), str(tmp), kind.upper()], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp.rename(out)
    return out


def artifact(checkpoint: Path, name: str, variant: str, root: Path) -> Path:
    def export(kind: str) -> Path:
        return exported(checkpoint, root / f"{name}-{kind}", dict(logits="last", **EXPORTS[kind]))

    if variant in EXPORTS:
        return export(variant)
    # the calibrations' source: the fp32 export
    return calibrated(export("fp32"), root / f"{name}-{variant}", PAIRS[variant][1])


def time_neoxrt(gen, prompt: np.ndarray, new: int) -> tuple[float, float]:
    """(prompt ms, decode ms/token): first token's latency, then the mean gap over `new` tokens."""
    stamps = [time.perf_counter()]
    for _ in gen.stream([prompt.tolist()], max_new_tokens=new + 1, ignore_eos=True):
        stamps.append(time.perf_counter())
    return (stamps[1] - stamps[0]) * 1e3, (stamps[-1] - stamps[1]) * 1e3 / new


def time_llamacpp(bins: Path, model: Path, context: int, new: int, threads: int) -> tuple[float, float]:
    """(pp`context` ms, tg`new` ms/token at depth `context`) from one llama-bench call (1 repetition)."""
    runs = []
    for args in (["-p", str(context), "-n", "0"], ["-p", "0", "-n", str(new), "-d", str(context)]):
        done = subprocess.run([str(bins / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", "1", "-o",
                               "json", *args], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
        runs.append(json.loads(done.stdout)[0]["avg_ns"] / 1e6)
    return runs[0], runs[1] / new


def bench(name: str, checkpoint: Path, contexts, passes: int, new: int, threads: int, cache: Path, bins: Path,
          root: Path, log) -> dict:
    from neoxrt.runtime import Generator

    ggufs = {v: gguf(checkpoint, name, kind, cache, bins, log) for v, (kind, _) in PAIRS.items()}
    gens = {}
    for v in PAIRS:
        log(f"{name}: artifact {v}")
        gens[v] = Generator.from_artifacts(artifact(checkpoint, name, v, root), threads=threads, verify=False)
    vocab = int(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
    rng = np.random.default_rng(0)
    for gen in gens.values():  # warm-up
        time_neoxrt(gen, rng.integers(2, vocab, 16), 4)
    rows = {}
    for p in range(passes):
        for context in contexts:
            prompt = rng.integers(2, vocab, context)
            for v, (kind, _) in PAIRS.items():
                ours = time_neoxrt(gens[v], prompt, new)
                theirs = time_llamacpp(bins, ggufs[v], context, new, threads)
                row = rows.setdefault(f"{v}/{kind}@{context}", {"ours": [], "llamacpp": []})
                row["ours"].append(ours)
                row["llamacpp"].append(theirs)
                log(f"{name} pass {p} c{context} {v}: prompt {ours[0]:.1f}/{theirs[0]:.1f} ms, "
                    f"decode {ours[1]:.2f}/{theirs[1]:.2f} ms/token")
    return rows


def summarise(rows: dict) -> list[dict]:
    lines = []
    for key, row in rows.items():
        ours, theirs = np.array(row["ours"]), np.array(row["llamacpp"])
        ratio = np.median(ours / theirs, axis=0)
        lines.append({"pair": key, "prompt_ratio": float(ratio[0]), "decode_ratio": float(ratio[1]),
                      "ours_prompt_ms": float(np.median(ours[:, 0])), "llamacpp_prompt_ms": float(np.median(theirs[:, 0])),
                      "ours_decode_ms": float(np.median(ours[:, 1])), "llamacpp_decode_ms": float(np.median(theirs[:, 1])),
                      "decode_ratios": [round(float(x), 3) for x in ours[:, 1] / theirs[:, 1]]})
    return lines


def markdown(results: dict, passes: int, threads: int) -> str:
    out = [f"neoxrt / llama.cpp, batch 1, {threads} threads, {passes} passes interleaved; ratios = median of "
           "per-pass ratios; ms = medians.", ""]
    for name, lines in results.items():
        out += [f"### {name}", "", "| pair @ context | decode ratio | decode ms/token (ours / llama.cpp) | "
                "prompt ratio | prompt ms (ours / llama.cpp) | per-pass decode ratios |", "|---|---|---|---|---|---|"]
        out += [f"| {x['pair']} | {x['decode_ratio']:.2f} | {x['ours_decode_ms']:.2f} / {x['llamacpp_decode_ms']:.2f} "
                f"| {x['prompt_ratio']:.2f} | {x['ours_prompt_ms']:.1f} / {x['llamacpp_prompt_ms']:.1f} | "
                f"{' '.join(map(str, x['decode_ratios']))} |" for x in lines]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--contexts", default="128")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--new", type=int, default=128, help="decoded tokens timed per pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=".cache/llama.cpp")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    cache, root, out = Path(args.cache), Path("artifacts/bench-llamacpp"), Path(args.out)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    bins = build(cache)
    contexts = [int(c) for c in args.contexts.split(",")]
    results = {}
    for name in args.models.split(","):
        checkpoint = model_checkpoint(name)
        rows = bench(name, checkpoint, contexts, args.passes, args.new, args.threads, cache, bins, root, log)
        results[name] = summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llamacpp.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, args.passes, args.threads)
    (out / "llamacpp.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
