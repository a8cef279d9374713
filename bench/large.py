"""`make bench-large`: the NeoX-20B shape exported to fp16 inside a memory limit.

    1. a seeded random checkpoint of the NeoX-20B shape, fp16, laid out as EleutherAI published it: ~1 GB
       safetensors shards, the old buffers (causal mask, masked_bias, inv_freq) in every layer and in the index,
       tokenizer.json and generation_config.json beside it; written tensor by tensor (each tensor a seeded
       window of a 64 MiB random pool: the export's cost does not depend on the values);
    2. a plain copy of part of it (`cp`, page cache dropped first): the disk's throughput in this run;
    3. `neoxrt export --dtype fp16` in a fresh process inside a memory cgroup (limit 3 GiB by default; it
       counts page cache too), page cache dropped first; its peak anonymous RSS polled from /proc every 20 ms
       by this (separate) process, the cgroup's own peak usage, time, and whether the kernel killed it;
    4. the 1-layer artifact loaded by ONNX Runtime in a fresh process: load time and RSS;
    5. (--int4, default) the deep fp16 artifact quantized to INT4 weights with the default method (gptq: it
       reads the tokenizer and the calibration text, one layer at a time) inside 3.5 GiB, `--method rtn` in the
       same limit for its time, and 8 tokens generated on the default's artifact inside 0.45 x the fp16 size
       + 1 GiB: its size, peaks, ms/token against the INT4 weight-bandwidth floor.

The same for a 1-layer checkpoint of that width, so the peak can be compared across depth. The full
44 layers need 2 x 41 GB of disk (checkpoint + artifact); where the disk has less, the deepest model that
fits is run and the report says so. `--results` also writes docs/results/large.json and large-int4.json
(docs/export.md and docs/quantization.md render them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from neoxrt.assets import DEFAULT_MODEL_DIR
from neoxrt.bench.results import add_results_flag, command_line
from neoxrt.bench.run import read_bandwidth

NEOX_20B = dict(vocab_size=50432, hidden_size=6144, num_layers=44, num_heads=64, intermediate_size=24576,
                max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5,
                use_parallel_residual=True, hidden_act="gelu_fast", tie_word_embeddings=False)
SHARD_BYTES = 1 << 30
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def hf_config(layers: int) -> dict:
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0, "eos_token_id": 0,
            "num_attention_heads": NEOX_20B["num_heads"], "num_hidden_layers": layers,
            **{k: v for k, v in NEOX_20B.items() if k not in ("num_heads", "num_layers")}}


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face names and shapes in the Hub's order."""
    h, i, v = NEOX_20B["hidden_size"], NEOX_20B["intermediate_size"], NEOX_20B["vocab_size"]
    out = [("gpt_neox.embed_in.weight", (v, h))]
    for n in range(layers):
        p = f"gpt_neox.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "input_layernorm.bias", (h,)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "post_attention_layernorm.bias", (h,)),
                (p + "attention.query_key_value.weight", (3 * h, h)), (p + "attention.query_key_value.bias", (3 * h,)),
                (p + "attention.dense.weight", (h, h)), (p + "attention.dense.bias", (h,)),
                (p + "mlp.dense_h_to_4h.weight", (i, h)), (p + "mlp.dense_h_to_4h.bias", (i,)),
                (p + "mlp.dense_4h_to_h.weight", (h, i)), (p + "mlp.dense_4h_to_h.bias", (h,))]
    return out + [("gpt_neox.final_layer_norm.weight", (h,)), ("gpt_neox.final_layer_norm.bias", (h,)),
                  ("embed_out.weight", (v, h))]


def buffers(layer: int) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """The old buffers every layer of the published NeoX-20B checkpoint carries (name, safetensors dtype, shape,
    bytes): the bool causal mask, masked_bias and the rotary inverse frequencies, in fp16 as `model.half()` left
    them. The export must skip them (and their index entries)."""
    p, rot = NEOX_20B["max_position_embeddings"], int(NEOX_20B["hidden_size"] // NEOX_20B["num_heads"] * NEOX_20B["rotary_pct"])
    prefix = f"gpt_neox.layers.{layer}.attention."
    inv_freq = 1.0 / NEOX_20B["rotary_emb_base"] ** (np.arange(0, rot, 2, dtype=np.float32) / rot)
    return [(prefix + "bias", "BOOL", (1, 1, p, p), np.tril(np.ones((p, p), np.uint8)).tobytes()),
            (prefix + "masked_bias", "F16", (), np.float16(-65504).tobytes()),
            (prefix + "rotary_emb.inv_freq", "F16", (rot // 2,), inv_freq.astype(np.float16).tobytes())]


def checkpoint_bytes(layers: int) -> int:
    return sum(math.prod(s) * 2 for _, s in tensor_shapes(layers))


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> Path:
    """A sharded fp16 safetensors checkpoint, written tensor by tensor (memory: the pool and one tensor)."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(32 << 20, dtype=np.float32) * 0.02).astype(np.float16)
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(layers):
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for k, tensors in enumerate(shards):
        shard = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        extra = [b for name, _ in tensors if name.endswith("attention.dense.bias")
                 for b in buffers(int(name.split(".")[2]))]  # each layer's buffers in the shard of its attention
        for name, tag, shape, data in extra:
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
            weight_map[name] = shard
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (tmp / shard).open("wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in tensors:
                n = math.prod(shape)
                if name.endswith("layernorm.weight"):
                    handle.write((1.0 + pool[:n].astype(np.float32) * 5).astype(np.float16).tobytes())
                    continue
                start = int(rng.integers(0, pool.size))
                reps = np.resize(np.roll(pool, -start), n) if n > pool.size else np.roll(pool, -start)[:n]
                handle.write(reps.tobytes())
            for _, _, _, data in extra:
                handle.write(data)
    (tmp / "config.json").write_text(json.dumps(hf_config(layers), indent=2))
    total = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    for name in ("tokenizer.json", "generation_config.json"):  # as the published folder has them: INT4 reads text
        shutil.copyfile(DEFAULT_MODEL_DIR / name, tmp / name)
    os.replace(tmp, folder)
    return folder


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def copy_throughput(folder: Path, scratch: Path, limit_bytes: int) -> dict:
    """`cp` of the first shards (up to `limit_bytes`) to `scratch`: bytes per second of a plain copy here."""
    files, total = [], 0
    for path in sorted(folder.glob("*.safetensors")):
        if total >= limit_bytes:
            break
        files.append(path)
        total += path.stat().st_size
    scratch.mkdir(parents=True, exist_ok=True)
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["cp", *map(str, files), str(scratch)], check=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return {"bytes": total, "seconds": round(seconds, 2), "gb_per_s": round(total / seconds / 1e9, 3)}


class Poller(threading.Thread):
    """Peak RssAnon / VmRSS of one pid, polled from /proc."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_anon, self.peak_rss, self.done = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
                self.peak_anon = max(self.peak_anon, int(fields["RssAnon"].split()[0]) * 1024)
                self.peak_rss = max(self.peak_rss, int(fields["VmRSS"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.02)


def run_limited(cmd: list[str], limit_bytes: int | None, name: str) -> dict:
    """Run `cmd` in a fresh memory cgroup of `limit_bytes` (if cgroup v1 is writable), polling its memory."""
    group = CGROUP_ROOT / f"neoxrt-{name}-{os.getpid()}"
    use_group = limit_bytes is not None and CGROUP_ROOT.is_dir() and os.access(CGROUP_ROOT, os.W_OK)
    prefix = []
    if use_group:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        prefix = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
    drop_caches()
    start = time.perf_counter()
    child = subprocess.Popen(prefix + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poller = Poller(child.pid)
    poller.start()
    output, _ = child.communicate()
    seconds = time.perf_counter() - start
    poller.done.set()
    poller.join()
    result = {"returncode": child.returncode, "seconds": round(seconds, 1), "peak_anon_bytes": poller.peak_anon,
              "peak_rss_bytes": poller.peak_rss, "tail": output.strip().splitlines()[-3:]}
    if use_group:
        result["cgroup_limit_bytes"] = limit_bytes
        result["cgroup_peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        result["cgroup_oom_kills"] = _oom_kills(group)
        group.rmdir()
    return result


def _oom_kills(group: Path) -> int:
    try:
        return int(dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines()).get("oom_kill", 0))
    except (OSError, ValueError):
        return -1


ORT_LOAD = """
import json, sys, time
import onnxruntime as ort
start = time.perf_counter()
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
fields = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({"load_seconds": round(time.perf_counter() - start, 2),
                  **{k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "RssAnon", "RssFile")}}))
"""


# prepended to a child's script: a thread keeping the child's peak anonymous memory in peak_anon[0] (VmHWM counts
# memory-mapped file pages too, which the kernel reclaims at will; ru_maxrss of a child forked from a large
# process inherits that process's RSS)
POLL_ANON = """
import threading as _threading, time as _time
peak_anon = [0]
def _poll_anon():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        _time.sleep(0.002)
_threading.Thread(target=_poll_anon, daemon=True).start()
"""

GENERATE = POLL_ANON + """
import json, sys, time
from neoxrt.runtime.generator import Generator
start = time.perf_counter()
generator = Generator.from_artifacts(sys.argv[1], threads=2)
loaded = time.perf_counter() - start
stamps = [time.perf_counter()]
for event in generator.stream([[510, 1375, 273, 253, 6456, 310]], max_new_tokens=int(sys.argv[2])):
    stamps.append(time.perf_counter())
gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
fields = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({"load_seconds": round(loaded, 2), "first_token_seconds": round(stamps[1] - stamps[0], 2),
                  "decode_ms_per_token": round(1e3 * sorted(gaps)[len(gaps) // 2], 1), "tokens": len(stamps) - 1,
                  "peak_anon_bytes": peak_anon[0], "vm_hwm_bytes": int(fields["VmHWM"].split()[0]) * 1024}))
"""


def int4_stage(fp16: Path, out: Path, depth: int, limit_gib: float, tokens: int) -> dict:
    """`neoxrt calibrate --weights-only --bits 4` (the default method, which reads the checkpoint's tokenizer and
    calibration text) of the fp16 artifact inside `limit_gib`, `--method rtn` in the same limit as the time
    reference, then generation on the default's artifact inside 0.45 x the fp16 artifact's size + 1 GiB."""
    fp16_bytes = sum(p.stat().st_size for p in fp16.iterdir())
    command = [sys.executable, "-m", "neoxrt", "calibrate", str(fp16), str(out), "--weights-only", "--bits", "4", "--force"]
    quantize = run_limited(command, int(limit_gib * 2**30), f"int4-{depth}")
    rtn_out = out.with_name(out.name + "-rtn")
    rtn = run_limited(command[:5] + [str(rtn_out)] + command[6:] + ["--method", "rtn"], int(limit_gib * 2**30),
                      f"int4-rtn-{depth}")
    shutil.rmtree(rtn_out, ignore_errors=True)
    row = {"quantize": quantize, "rtn": rtn, "fp16_bytes": fp16_bytes}
    if quantize["returncode"] != 0:
        return row
    row["method"] = json.loads((out / "manifest.json").read_text())["quantization"]["method"]
    row["time_over_rtn"] = round(quantize["seconds"] / rtn["seconds"], 2) if rtn["returncode"] == 0 else None
    row["int4_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    row["size_ratio"] = round(row["int4_bytes"] / fp16_bytes, 3)
    limit = int(0.45 * fp16_bytes + 2**30)
    generate = run_limited([sys.executable, "-c", GENERATE, str(out), str(tokens)], limit, f"gen-{depth}")
    row["generate"] = generate
    if generate["returncode"] == 0:
        row["generate"].update(json.loads(generate["tail"][-1]))
        gbs = read_bandwidth(2, 1024)
        # bytes read per decode step: every weight but the embedding (one row per token)
        manifest = json.loads((out / "manifest.json").read_text())
        embed = manifest["config"]["vocab_size"] * manifest["config"]["hidden_size"] * 2
        row["bandwidth_gbs"] = round(gbs, 1)
        row["floor_ms"] = round((row["int4_bytes"] - embed) / (gbs * 1e9) * 1e3, 1)
        row["decode_over_floor"] = round(row["generate"]["decode_ms_per_token"] / row["floor_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neoxrt.bench.large", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="artifacts/bench-large", help="where checkpoints and artifacts go")
    parser.add_argument("--layers", type=int, default=None, help="depth of the deep run (default: 44, or the most "
                        "that fits on the disk)")
    parser.add_argument("--limit-gib", type=float, default=3.0, help="memory cgroup limit for the export")
    parser.add_argument("--copy-gib", type=float, default=8.0, help="bytes copied for the throughput reference")
    parser.add_argument("--keep", action="store_true", help="keep the deep checkpoint and artifact")
    parser.add_argument("--int4", action=argparse.BooleanOptionalAction, default=True,
                        help="quantize the deep fp16 artifact to INT4 (the default method, and rtn for its time) and "
                        "generate on it, each in a memory limit")
    parser.add_argument("--int4-limit-gib", type=float, default=3.5, help="memory cgroup limit for the INT4 quantization")
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated on the INT4 artifact")
    add_results_flag(parser, "large")
    args = parser.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    per_layer = checkpoint_bytes(1) - checkpoint_bytes(0)
    fits = int((free - (4 << 30) - 2 * checkpoint_bytes(0)) // (2 * per_layer))
    layers = args.layers or min(NEOX_20B["num_layers"], fits)
    print(f"disk: {free / 1e9:.1f} GB free; 44 layers need {2 * checkpoint_bytes(44) / 1e9:.1f} GB "
          f"(checkpoint + fp16 artifact); running 1 and {layers} layers", flush=True)
    rows = []
    for depth in sorted({1, layers}):
        ckpt = root / f"neox20b-shape-{depth}l"
        start = time.perf_counter()
        write_checkpoint(ckpt, depth)
        written = time.perf_counter() - start
        copy = copy_throughput(ckpt, root / "copy-scratch", int(args.copy_gib * 2**30))
        out = root / f"neox20b-shape-{depth}l-fp16"
        export = run_limited([sys.executable, "-m", "neoxrt", "export", str(ckpt), str(out), "--dtype", "fp16", "--force"],
                             int(args.limit_gib * 2**30), f"export{depth}")
        row = {"layers": depth, "checkpoint_bytes": checkpoint_bytes(depth), "checkpoint_write_seconds": round(written, 1),
               "copy": copy, "export": export}
        if export["returncode"] == 0:
            row["artifact_bytes"] = sum(p.stat().st_size for p in out.iterdir())
            row["export_over_copy"] = round(export["seconds"] / (row["checkpoint_bytes"] / (copy["gb_per_s"] * 1e9)), 2)
            if depth == 1:
                done = subprocess.run([sys.executable, "-c", ORT_LOAD, str(out / "model.onnx")], capture_output=True,
                                      text=True, timeout=600)
                row["ort_load"] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}
        if depth != 1 and not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)  # the export is the INT4 stage's source; the disk needs room
        if depth != 1 and args.int4 and export["returncode"] == 0:
            row["int4"] = int4_stage(out, root / f"neox20b-shape-{depth}l-int4", depth, args.int4_limit_gib, args.tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if depth != 1 and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(root / f"neox20b-shape-{depth}l-int4", ignore_errors=True)
    (root / "bench-large.json").write_text(json.dumps(rows, indent=2))
    print(render(rows, args.limit_gib))
    print(render_int4(rows, args.int4_limit_gib))
    if args.results:
        publish(rows, args, command_line("neoxrt.bench.large", argv))
    ok = all(r["export"]["returncode"] == 0 for r in rows)
    return 0 if ok and all(r["int4"]["quantize"]["returncode"] == 0 for r in rows if "int4" in r) else 1


def export_table(rows: list[dict], limit_gib: float) -> tuple[list[str], list[list]]:
    columns = ["layers", "checkpoint GB", "export s", "plain copy GB/s", "export / copy time", "peak RssAnon GiB",
               f"cgroup peak GiB (limit {limit_gib:g})", "OOM kills"]
    cells = []
    for r in rows:
        e = r["export"]
        cells.append([r["layers"], f"{r['checkpoint_bytes'] / 1e9:.2f}", e["seconds"], r["copy"]["gb_per_s"],
                      r.get("export_over_copy", "-"), f"{e['peak_anon_bytes'] / 2**30:.2f}",
                      f"{e.get('cgroup_peak_bytes', 0) / 2**30:.2f}", e.get("cgroup_oom_kills", "-")])
    return columns, cells


def int4_table(rows: list[dict], limit_gib: float) -> tuple[list[str], list[list]]:
    columns = ["layers", "method", "fp16 GB", "INT4 GB (ratio)", "quantize s (rtn s)", "quantize peak RssAnon GiB",
               f"cgroup peak GiB (limit {limit_gib:g})", "OOM kills", "generate limit GiB", "generate peak RssAnon GiB",
               "load s", "ms/token", "floor ms", "vs floor"]
    cells = []
    for r in rows:
        x = r.get("int4")
        if not x:
            continue
        q, g = x["quantize"], x.get("generate", {})
        cells.append([r["layers"], x.get("method", "-"), f"{x['fp16_bytes'] / 1e9:.2f}",
                      f"{x.get('int4_bytes', 0) / 1e9:.2f} ({x.get('size_ratio', '-')})",
                      f"{q['seconds']} ({x['rtn']['seconds']})", f"{q['peak_anon_bytes'] / 2**30:.2f}",
                      f"{q.get('cgroup_peak_bytes', 0) / 2**30:.2f}", q.get("cgroup_oom_kills", "-"),
                      f"{g.get('cgroup_limit_bytes', 0) / 2**30:.2f}", f"{g.get('peak_anon_bytes', 0) / 2**30:.2f}",
                      g.get("load_seconds", "-"), g.get("decode_ms_per_token", "-"), x.get("floor_ms", "-"),
                      x.get("decode_over_floor", "-")])
    return columns, cells


def markdown(table: tuple[list[str], list[list]]) -> str:
    columns, cells = table
    return "\n".join(["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|",
                      *("| " + " | ".join(str(c) for c in row) + " |" for row in cells)])


def render(rows: list[dict], limit_gib: float) -> str:
    return markdown(export_table(rows, limit_gib))


def render_int4(rows: list[dict], limit_gib: float) -> str:
    return markdown(int4_table(rows, limit_gib))


def publish(rows: list[dict], args, command: str) -> None:
    """docs/results/NAME.json (the export; the plain copy in the same run is its reference) and NAME-int4.json."""
    from neoxrt.bench.results import write_result

    write_result(args.results, "The NeoX-20B shape exported to fp16 inside a memory limit", *export_table(rows, args.limit_gib),
                 command=command, reference="a plain copy of the checkpoint on the same disk in the same run (the copy "
                 "GB/s and export / copy columns)")
    if any("int4" in r for r in rows):
        write_result(f"{args.results}-int4", "INT4 weights (the default method) of the NeoX-20B width, quantized and run "
                     "in memory limits", *int4_table(rows, args.int4_limit_gib), command=command,
                     reference="--method rtn's time in the same limit, same run (in brackets); the INT4 weight-bandwidth "
                     "floor measured in the same run")


if __name__ == "__main__":
    sys.exit(main())

