"""INT4 decode speed against our INT8 weights-only and fp32, interleaved in one process, and the INT4 weight
bandwidth floor: `python -m neoxrt.bench.int4_speed [--models trained-14m,pythia-160m] [--levels 4,0]`.

Artifacts come from bench/llamacpp.py's cache (fp32 fused export with last-position logits; `neoxrt calibrate
--weights-only` INT8; `--bits 4` awq block 32). Each extra MatMulNBits accuracy level is a copy of the INT4
artifact with only that node attribute changed (the weights file hard-linked). Per pass every engine decodes
`new` tokens after a `context`-token prompt (batch 1); ratios are per pass, the table gives their medians. The
floor is the bytes of the weights a decode step reads (every MatMul/MatMulNBits initializer, LM head included)
over the read bandwidth measured in the same run. Writes bench-results/int4_speed.{md,json}."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from neoxrt.bench.llamacpp import artifact, model_checkpoint, time_neoxrt
from neoxrt.bench.run import read_bandwidth
from neoxrt.bench.shapes import fresh


def with_accuracy_level(src: Path, level: int) -> Path:
    """A copy of INT4 artifact `src` whose MatMulNBits nodes carry accuracy_level `level`."""
    import onnx

    out = src.with_name(f"{src.name}-acc{level}")
    if fresh(out):
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        if f.name == "model.onnx":
            continue
        (os.link if f.name == "model.onnx.data" else shutil.copyfile)(f, tmp / f.name)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    onnx.save(model, str(tmp / "model.onnx"))
    tmp.rename(out)
    return out


def weight_bytes(path: Path) -> int:
    """Bytes of the initializers feeding MatMul / MatMulNBits / Gemm (or their DequantizeLinear): what one decode
    step reads."""
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or \
            int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "MatMulNBits", "Gemm")]
    fed = {i for n in matmuls for i in n.input}
    used = fed | {i for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in fed for i in n.input}
    return sum(s for name, s in sizes.items() if name in used)


def main(argv: list[str] | None = None) -> int:
    from neoxrt.runtime import Generator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="trained-14m,pythia-160m")
    parser.add_argument("--levels", default="4,0", help="MatMulNBits accuracy levels of the INT4 artifact to time")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    root = Path("artifacts/bench-llamacpp")
    bandwidth = read_bandwidth(args.threads)
    report = {"read_bandwidth_gbs": bandwidth, "models": {}}
    lines = [f"batch 1, {args.threads} threads, prompt {args.context}, {args.new} tokens, {args.passes} passes "
             f"interleaved; read bandwidth {bandwidth:.1f} GB/s; ratios: median of per-pass ratios", "",
             "| model | engine | decode ms/token | prompt ms | vs int8-weights | vs fp32 | weight MB | floor ms | vs floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        checkpoint = model_checkpoint(name)
        paths = {v: artifact(checkpoint, name, v, root) for v in ("fp32", "int8-weights", "int4")}
        for level in [int(x) for x in args.levels.split(",")]:
            paths[f"int4-acc{level}"] = with_accuracy_level(paths["int4"], level)
        del paths["int4"]
        gens = {k: Generator.from_artifacts(p, threads=args.threads, verify=False) for k, p in paths.items()}
        vocab = gens["fp32"].session.io_spec()[1][0].shape[-1]
        rng = np.random.default_rng(0)
        for gen in gens.values():
            time_neoxrt(gen, rng.integers(2, vocab, 16), 4)
        times = {k: [] for k in gens}
        for _ in range(args.passes):
            prompt = rng.integers(2, vocab, args.context)
            for k, gen in gens.items():
                times[k].append(time_neoxrt(gen, prompt, args.new))
        rows = {}
        for k in gens:
            t = np.array(times[k])
            floor = weight_bytes(paths[k]) / bandwidth / 1e6
            rows[k] = {"decode_ms": float(np.median(t[:, 1])), "prompt_ms": float(np.median(t[:, 0])),
                       "vs_int8_weights": float(np.median(t[:, 1] / np.array(times["int8-weights"])[:, 1])),
                       "vs_fp32": float(np.median(t[:, 1] / np.array(times["fp32"])[:, 1])),
                       "weight_mb": weight_bytes(paths[k]) / 1e6, "floor_ms": floor,
                       "vs_floor": float(np.median(t[:, 1])) / floor}
            r = rows[k]
            lines.append(f"| {name} | {k} | {r['decode_ms']:.2f} | {r['prompt_ms']:.1f} | {r['vs_int8_weights']:.2f} | "
                         f"{r['vs_fp32']:.2f} | {r['weight_mb']:.1f} | {r['floor_ms']:.2f} | {r['vs_floor']:.2f} |")
            print(lines[-1], flush=True)
        report["models"][name] = rows
        del gens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int4_speed.json").write_text(json.dumps(report, indent=1))
    (out / "int4_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
