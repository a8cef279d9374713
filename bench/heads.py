"""`make bench-heads`: sequence classification (a reward-model-like workload), batch 8 x 128 tokens, Pythia-160m
shape (random weights): neoxrt's export (fp32, and its INT8 W8A8 / weights-only calibrations, each with its
label agreement and max logit difference against the fp32 artifact) on `Classifier` against transformers (sdpa,
eager) and Optimum's own export on `ORTModelForSequenceClassification`. Each engine runs in its own process, threads pinned equal,
engines interleaved over rounds; per engine the median of its runs, pooled over rounds. Writes
artifacts/bench/heads.json and prints a Markdown table.

    python -m neoxrt.bench.heads [--rounds 3] [--runs 10] [--threads 2] [--batch 8] [--context 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from neoxrt.bench.shapes import SHAPES, calibrated, fresh

ENGINES = ["neoxrt-ort-fused", "neoxrt-ort-decomposed", "neoxrt-ort-int8", "neoxrt-ort-int8-weights", "optimum-ort",
           "hf-sdpa", "hf-eager"]
# INT8 rows: `neoxrt calibrate` of the fused fp32 export (defaults: W8A8 SmoothQuant; --weights-only)
INT8_VARIANTS = {"neoxrt-ort-int8": {}, "neoxrt-ort-int8-weights": {"weights_only": True}}
REFERENCE = "neoxrt-ort-fused"  # every row's logits are compared with the fp32 artifact's on the bench inputs
ROOT = Path("artifacts/bench")


def classifier_checkpoint(shape: str, root: Path) -> Path:
    """A seeded random GPTNeoXForSequenceClassification of `shape` (2 labels, pad token 0), written once."""
    folder = root / f"{shape}-seqcls-random"
    if (folder / "model.safetensors").is_file():
        return folder
    import shutil

    import torch
    import transformers

    from neoxrt.assets import DEFAULT_TOKENIZER
    from neoxrt.model import NeoXConfig, config_to_hf

    hf = {**config_to_hf(NeoXConfig(**SHAPES[shape])), "architectures": ["GPTNeoXForSequenceClassification"],
          "num_labels": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    transformers.GPTNeoXForSequenceClassification(transformers.GPTNeoXConfig(**hf)).save_pretrained(folder)
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    return folder


def _engine(spec: dict):
    """run(ids, mask) for one engine, loaded in this process."""
    threads = spec["threads"]
    engine = spec["engine"]
    if engine.startswith("neoxrt-ort"):
        from neoxrt.runtime import Classifier

        classifier = Classifier.from_artifacts(spec["artifact"], threads=threads, batch_size=spec["batch"], verify=False)
        return lambda ids, mask: np.stack([out["logits"] for out in classifier.run_rows(ids.tolist())])
    import torch

    torch.set_num_threads(threads)
    if engine.startswith("hf-"):
        from transformers import GPTNeoXForSequenceClassification

        model = GPTNeoXForSequenceClassification.from_pretrained(spec["checkpoint"], dtype=torch.float32,
                                                                 attn_implementation=engine[3:]).eval()

        def run(ids, mask):
            with torch.no_grad():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits

        return run
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSequenceClassification

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    model = ORTModelForSequenceClassification.from_pretrained(spec["artifact"], session_options=options)
    return lambda ids, mask: model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits


def child(spec: dict) -> dict:
    run = _engine(spec)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50000, (spec["batch"], spec["context"])).astype(np.int64)  # no pad token (0)
    mask = np.ones_like(ids)
    logits = np.asarray(run(ids, mask), np.float32)  # warm-up; its logits for the accuracy columns
    times = []
    for _ in range(spec["runs"]):
        start = time.perf_counter()
        run(ids, mask)
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": times, "logits": logits.tolist()}


def prepare(ckpt: Path, root: Path) -> dict[str, str]:
    """Artifacts per engine: our exports (fused, decomposed) and Optimum's own export."""
    artifacts = {}
    for flavour in ("fused", "decomposed"):
        out = root / f"seqcls-{flavour}"
        if not fresh(out):
            subprocess.run([sys.executable, "-m", "neoxrt", "export", str(ckpt), str(out), "--attention", flavour,
                            "--force"], check=True)
        artifacts[f"neoxrt-ort-{flavour}"] = str(out)
    for engine, options in INT8_VARIANTS.items():
        out = calibrated(Path(artifacts[REFERENCE]), root / f"seqcls-{engine.removeprefix('neoxrt-ort-')}", options)
        artifacts[engine] = str(out)
    out = root / "seqcls-optimum"
    if not (out / "model.onnx").is_file():
        from optimum.onnxruntime import ORTModelForSequenceClassification

        ORTModelForSequenceClassification.from_pretrained(ckpt, export=True).save_pretrained(out)
    artifacts["optimum-ort"] = str(out)
    return artifacts


def accuracy(logits: np.ndarray, reference: np.ndarray | None) -> dict:
    """Label agreement (argmax per row, as 'k/n') and the largest |logit difference| against the reference."""
    if reference is None:
        return {"label_agreement": None, "max_abs_logit_diff": None}
    same = int((logits.argmax(axis=-1) == reference.argmax(axis=-1)).sum())
    return {"label_agreement": f"{same}/{len(reference)}",
            "max_abs_logit_diff": float(f"{np.abs(logits - reference).max():.3g}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neoxrt.bench.heads", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--shape", default="pythia-160m", choices=list(SHAPES))
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    args = parser.parse_args(argv)
    ROOT.mkdir(parents=True, exist_ok=True)
    ckpt = classifier_checkpoint(args.shape, ROOT)
    artifacts = prepare(ckpt, ROOT)
    times: dict[str, list[float]] = {e: [] for e in args.engines}
    logits: dict[str, np.ndarray] = {}
    for rnd in range(args.rounds):
        for engine in (args.engines if rnd % 2 == 0 else args.engines[::-1]):
            spec = {"engine": engine, "threads": args.threads, "batch": args.batch, "context": args.context,
                    "runs": args.runs, "checkpoint": str(ckpt), "artifact": artifacts.get(engine)}
            done = subprocess.run([sys.executable, "-m", "neoxrt.bench.heads", "--child", json.dumps(spec)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            times[engine].append(float(np.median(result["ms"])))
            logits[engine] = np.asarray(result["logits"], np.float32)
            print(f"round {rnd + 1} {engine}: {times[engine][-1]:.1f} ms", file=sys.stderr)
    median = {e: float(np.median(t)) for e, t in times.items()}
    rows = [{"engine": e, "ms": round(median[e], 1), "round_medians": [round(t, 1) for t in times[e]],
             "vs_hf_sdpa": round(median[e] / median["hf-sdpa"], 2) if "hf-sdpa" in median else None,
             "vs_optimum": round(median[e] / median["optimum-ort"], 2) if "optimum-ort" in median else None,
             **accuracy(logits[e], logits.get(REFERENCE))} for e in args.engines]
    (ROOT / "heads.json").write_text(json.dumps({"shape": args.shape, "batch": args.batch, "context": args.context,
                                                 "threads": args.threads, "rows": rows}, indent=2))
    print(f"\n{args.shape} text-classification, batch {args.batch} x {args.context} tokens, {args.threads} threads, "
          f"{args.rounds} rounds x {args.runs} runs\n")
    print(f"| engine | ms per batch (median) | round medians | vs hf-sdpa | vs optimum | labels = {REFERENCE} | "
          "max abs logit diff |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['ms']} | {', '.join(map(str, r['round_medians']))} | {r['vs_hf_sdpa']}x | "
              f"{r['vs_optimum']}x | {r['label_agreement']} | {r['max_abs_logit_diff']} |")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
