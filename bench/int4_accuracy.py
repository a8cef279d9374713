"""Teacher-forced perplexity of quantized artifacts against their fp32 export, all on the same windows in one run.

    python -m neoxrt.bench.int4_accuracy FP32_ARTIFACT ARTIFACT... [--text FILE] [--windows N] [--seq-len S]

Windows: the text tokenised whole and cut into non-overlapping windows of S tokens, N of them evenly spaced (a
long held-out text gives a perplexity difference steadier than `neoxrt compare`'s default slice of 16 x 128
tokens). The fp32 export is the reference (it matches PyTorch within 1e-4: `neoxrt compare`). Prints one row
per artifact (method and block from its manifest) and writes the rows as JSON with `--out`; `--results` also
docs/results/int4-accuracy.json (the fp32 export as the reference; docs/quantization.md renders it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.assets import EVAL_TEXT
from neoxrt.bench.results import add_results_flag, command_line


def windows(tokenizer, text: Path, count: int, seq_len: int) -> np.ndarray:
    ids = tokenizer.encode(text.read_text(encoding="utf-8")).ids
    available = len(ids) // seq_len
    cut = np.asarray(ids[: available * seq_len], np.int64).reshape(available, seq_len)
    return cut[np.unique(np.linspace(0, available - 1, min(count, available)).astype(np.int64))]


def mean_nll(artifact: Path, ids: np.ndarray, threads: int, batch: int = 8) -> float:
    """Mean negative log-likelihood of each window's next tokens (prompt steps, past 0)."""
    import onnxruntime as ort

    manifest = json.loads((artifact / io.MANIFEST_FILE).read_text())
    config = manifest["config"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only (TensorScatter warns on every run of a static graph not in place)
    options.intra_op_num_threads = threads
    for key, value in manifest.get("ort_session_config", {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(artifact / io.MODEL_FILE), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    kv = "float16" if manifest["export_options"].get("dtype") == "fp16" else "float32"
    total, count = 0.0, 0
    for start in range(0, len(ids), batch):
        rows = ids[start: start + batch]
        pos = np.broadcast_to(np.arange(rows.shape[1], dtype=np.int64), rows.shape).copy()
        feeds = io.prompt_feeds(rows, np.ones_like(rows), pos, config["num_layers"], config["num_heads"],
                                config["hidden_size"] // config["num_heads"], kv, static=io.WRITE_INDICES in names)
        logits = session.run([io.LOGITS], {k: v for k, v in feeds.items() if k in names})[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= float(np.take_along_axis(logp[:, :-1], rows[:, 1:, None], axis=-1).sum())
        count += rows[:, 1:].size
    return total / count


def describe(artifact: Path) -> str:
    q = json.loads((artifact / io.MANIFEST_FILE).read_text()).get("quantization", {})
    if not q:
        return "-"
    method = q.get("method") or q.get("scheme", "?").split(" (")[0]
    return f"{method}, {q.get('bits', '?')}-bit" + (f", block {q['block_size']}" if "block_size" in q else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neoxrt.bench.int4_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the fp32 export the others were quantized from")
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--text", type=Path, default=EVAL_TEXT, help="held-out text (default: the embedded slice)")
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    add_results_flag(parser, "int4-accuracy")
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    ids = windows(Tokenizer.from_file(str(args.reference / io.TOKENIZER_FILE)), args.text, args.windows, args.seq_len)
    base = mean_nll(args.reference, ids, args.threads)
    rows = [{"artifact": str(args.reference), "method": "fp32 export", "perplexity": float(np.exp(base)),
             "delta_pct": 0.0}]
    for artifact in args.artifacts:
        nll = mean_nll(artifact, ids, args.threads)
        rows.append({"artifact": str(artifact), "method": describe(artifact), "perplexity": float(np.exp(nll)),
                     "delta_pct": float(100 * (np.exp(nll - base) - 1))})
    print(f"{len(ids)} windows x {args.seq_len} tokens of {args.text.name}")
    print("| artifact | method | perplexity | vs fp32 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['artifact']).name} | {r['method']} | {r['perplexity']:.3f} | {r['delta_pct']:+.3f} % |")
    if args.out:
        args.out.write_text(json.dumps({"text": args.text.name, "windows": int(len(ids)), "seq_len": args.seq_len,
                                        "rows": rows}, indent=2))
    if args.results:
        publish(rows, args, command_line("neoxrt.bench.int4_accuracy", argv), len(ids))
    return 0


def publish(rows: list[dict], args, command: str, windows: int) -> Path:
    """docs/results/NAME.json: one row per quantized artifact, the fp32 export as the reference row; the first
    quantized artifact named is the README's headline."""
    from neoxrt.bench.results import write_result

    def cells(r):
        return [r["method"], round(r["perplexity"], 3), None if r is rows[0] else f"{r['delta_pct']:+.3f} %"]

    headline = [{"measure": f"INT4 weights ({rows[1]['method']}): perplexity on {args.text.name}", "neoxrt":
                 round(rows[1]["perplexity"], 3), "reference": f"{rows[0]['perplexity']:.3f} (fp32 export)",
                 "ratio": f"{rows[1]['delta_pct']:+.3f} %"}] if len(rows) > 1 else []
    return write_result(args.results, "INT4 weights: perplexity against the fp32 export, the same windows",
                        ["method", "perplexity", "vs fp32"], [cells(r) for r in rows[1:]], command=command,
                        reference="the fp32 export the artifacts were quantized from, same windows, same run",
                        reference_rows=[cells(rows[0])], headline=headline,
                        notes=f"{windows} windows x {args.seq_len} tokens of {args.text.name}.")


if __name__ == "__main__":
    sys.exit(main())
