"""`make bench-serve`: `neoxrt serve` through the real server, Pythia-160m shape (random weights), CPU.

Per artifact (fp32, INT8 weights-only): start `neoxrt serve` (ONNX Runtime on --threads), time to ready and
the server's RSS (tritonserver + its Python stub); then 1 client at a time and N concurrent clients, each
streaming (SSE, `generate_stream`) a 32-token prompt to 64 new tokens (ignore_eos). Reported: aggregate
tokens/s, time to first token and request latency (p50/p99), batch occupancy from the server's
neoxrt_row_steps/neoxrt_steps counters over the phase. vLLM's CPU backend is run in the same run only where
`vllm` is installed; otherwise the bench says so and prints no vLLM rows (figures from another run are no
reference).

Writes bench-results/serve.{md,json,png}; `--results` also docs/results/serve.json (vLLM's rows, when run, as the
reference; docs/serving.md renders it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from neoxrt.bench.results import add_results_flag, command_line, write_result
from neoxrt.serve.server import http_ok

TARGETS = dict(speedup=4.0, ttft_p50_ms=300.0, rss_mib=1536.0, ready_s=10.0)


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        found.append(p)
        frontier += [c for c, parent in parents.items() if parent == p]
    return found


def _rss_mib(pid: int) -> float:
    """RSS of `pid` and all its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total / 2**20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and all its live descendants."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


class Served:
    """`neoxrt serve ARTIFACT` as a child process, stopped by pid."""

    def __init__(self, artifact: Path, threads: int, max_batch: int, port: int, openai: bool = False):
        """Ports: HTTP `port`, gRPC +1, metrics +2 and, with `openai`, the OpenAI endpoint +3."""
        self.http, self.metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 2}"
        self.openai = f"http://127.0.0.1:{port + 3}/v1"
        argv = [sys.executable, "-m", "neoxrt.cli", "serve", str(artifact), "--http-port", str(port), "--grpc-port",
                str(port + 1), "--metrics-port", str(port + 2), "--threads", str(threads), "--max-batch", str(max_batch)]
        argv += ["--openai-port", str(port + 3)] if openai else []
        start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while True:
            line = self.proc.stdout.readline()
            if "ready" in line:
                break
            if not line or time.monotonic() - start > 180:
                self.stop()
                raise RuntimeError(f"neoxrt serve did not get ready: {line}")
        self.ready_s = time.monotonic() - start

    def counters(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.metrics}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {x.split("{")[0]: float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("neoxrt_")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class VllmServed:
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`, as the issue ran it) as a child
    process on 127.0.0.1, stopped by pid (its engine-core and worker children with it)."""

    def __init__(self, python: str, checkpoint: Path, dtype: str, threads: int, max_batch: int, port: int,
                 max_model_len: int = 512, kv_space: int | None = 2):
        """`kv_space`: VLLM_CPU_KVCACHE_SPACE in GiB (None: vLLM's default)."""
        self.openai = f"http://127.0.0.1:{port}/v1"
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--dtype", dtype,
                "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_batch), "--max-model-len",
                str(max_model_len), "--served-model-name", "neoxrt"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
        if kv_space is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space)
        start = time.monotonic()
        self.log = open(Path(checkpoint).parent / f"vllm-{dtype}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while not http_ok(f"http://127.0.0.1:{port}/health", timeout=5):
            if self.proc.poll() is not None or time.monotonic() - start > 600:
                self.stop()
                raise RuntimeError(f"vLLM did not get ready; see {self.log.name}")
            time.sleep(1)
        self.ready_s = time.monotonic() - start

    def stop(self) -> None:
        """The whole process group, even when the API server already died (its engine and worker may not have):
        SIGTERM, up to 30 s for the group to go, then SIGKILL."""
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # nobody left in the group
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._group_alive():
                time.sleep(0.2)
        self.log.close()

    def _group_alive(self) -> bool:
        self.proc.poll()  # reap the API server itself, so its pid leaves the group
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False


def vllm_python(arg: str | None) -> str | None:
    """The interpreter to run vLLM with: `arg`, else this one where it imports vllm, else None."""
    if arg:
        return arg
    return sys.executable if importlib.util.find_spec("vllm") else None


def stream_one(http: str, prompt: str, new_tokens: int) -> dict:
    """One streamed generate_stream request to Triton (SSE, an event per token)."""
    body = {"text_input": prompt, "max_tokens": new_tokens, "stream": True, "ignore_eos": True}
    return timed_sse(f"{http}/v2/models/neoxrt/generate_stream", body)


def stream_openai(base: str, prompt: str, new_tokens: int) -> dict:
    """One streamed /v1/completions request (SSE, a chunk per token, then `data: [DONE]`)."""
    body = {"model": "neoxrt", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    return timed_sse(f"{base}/completions", body)


def sse_events(url: str, body: dict, timeout: float = 600):
    """POST `body`; each JSON event of the server-sent stream as it arrives."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


def timed_sse(url: str, body: dict) -> dict:
    """POST `body`, read the event stream; time to the first event and to the end, events (= tokens) counted."""
    start = time.perf_counter()
    first, tokens, usage = None, 0, None
    for event in sse_events(url, body):
        if "error" in event:
            raise RuntimeError(event["error"])
        if event.get("usage") and not event.get("choices"):  # OpenAI's usage chunk: the server's count
            usage = event["usage"]["completion_tokens"]
            continue
        tokens += 1
        first = first or time.perf_counter()
    end = time.perf_counter()
    # a server may merge tokens into one chunk or skip empty ones: its own count where it gives one
    return dict(ttft_ms=(first - start) * 1e3, latency_ms=(end - start) * 1e3, tokens=usage or tokens)


def phase(served: Served, prompts: list[str], clients: int, requests_each: int, new_tokens: int, send=None) -> dict:
    """`clients` threads, each sending `requests_each` requests back to back (`send(prompt, new_tokens)`; default:
    Triton's generate_stream)."""
    send = send or (lambda prompt, n: stream_one(served.http, prompt, n))
    counted = hasattr(served, "counters")  # our server's step counters (batch occupancy); vLLM has none here
    before = served.counters() if counted else {}
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(requests_each):
            r = send(prompts[(c * requests_each + i) % len(prompts)], new_tokens)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = served.counters() if counted else {}
    steps = after.get("neoxrt_steps_total", 0) - before.get("neoxrt_steps_total", 0)
    rows = after.get("neoxrt_row_steps_total", 0) - before.get("neoxrt_row_steps_total", 0)
    ttft, lat = [r["ttft_ms"] for r in results], [r["latency_ms"] for r in results]
    return dict(clients=clients, requests=len(results), tokens=sum(r["tokens"] for r in results), wall_s=wall,
                tokens_per_s=sum(r["tokens"] for r in results) / wall,
                ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p99_ms=float(np.percentile(ttft, 99)),
                latency_p50_ms=float(np.percentile(lat, 50)), latency_p99_ms=float(np.percentile(lat, 99)),
                mean_rows_per_step=rows / steps if steps else None)


def prompts_of(tokens: int, count: int) -> list[str]:
    """`count` prompts of `tokens` tokens from the embedded corpus (GPT-NeoX tokenizer)."""
    from tokenizers import Tokenizer

    from neoxrt.assets import DEFAULT_TOKENIZER, EVAL_TEXT

    tok = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    ids = tok.encode(EVAL_TEXT.read_text()[:200_000]).ids
    return [tok.decode(ids[i * tokens:(i + 1) * tokens]) for i in range(count)]


def run(args) -> dict:
    from neoxrt.bench.run import neoxrt_artifact
    from neoxrt.bench.shapes import shape_checkpoint

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = shape_checkpoint("pythia-160m", root)
    prompts = prompts_of(32, 64)
    rows = []
    for variant, label in (("fused-last", "neoxrt fp32"), ("int8-weights", "neoxrt INT8 weights-only"))[: args.artifacts]:
        artifact = neoxrt_artifact("pythia-160m", ckpt, variant, root)
        served = Served(artifact, args.threads, args.clients, args.port)
        rows += _measure(label, served, lambda prompt, n, http=served.http: stream_one(http, prompt, n), prompts, args)
    python, failed = vllm_python(args.vllm_python), ""
    for dtype in ("float32", "bfloat16") if python else ():
        label = f"vLLM {'fp32' if dtype == 'float32' else 'bf16'}"
        try:
            served = VllmServed(python, ckpt, dtype, args.threads, args.clients, args.port + 10)
        except RuntimeError as exc:  # keep what was measured; say why vLLM has no (more) rows
            print(f"{label}: {exc}", flush=True)
            failed = f"; {label} did not start: {exc}"
            break
        rows += _measure(label, served, lambda prompt, n, base=served.openai: stream_openai(base, prompt, n), prompts,
                         args)
    ran = any(r["server"].startswith("vLLM") for r in rows)
    vllm = (f"run in this run ({python}){failed}" if python else "not installed") + ("" if ran else ": no vLLM rows")
    return dict(rows=rows, vllm=vllm, threads=args.threads,
                new_tokens=args.new_tokens, prompt_tokens=32, machine=f"{os.cpu_count()} CPUs, {args.machine}")


def _measure(label: str, served, send, prompts: list[str], args) -> list[dict]:
    """A started server's two phases (1 client, then `args.clients`), its RSS idle and after, then stopped; its
    two rows."""
    try:
        rss_idle = _rss_mib(served.proc.pid)
        send(prompts[0], 4)  # warm-up
        one = phase(served, prompts, 1, args.single_requests, args.new_tokens, send=send)
        many = phase(served, prompts, args.clients, args.requests_each, args.new_tokens, send=send)
        rss = _rss_mib(served.proc.pid)
    finally:
        served.stop()
    return _rows(label, one, many, served.ready_s, max(rss, rss_idle), args.clients)


def _rows(label: str, one: dict, many: dict, ready_s: float, rss_mib: float, clients: int) -> list[dict]:
    for p in (one, many):
        rows_per_step = p["mean_rows_per_step"]
        p.update(server=label, occupancy=None if rows_per_step is None else rows_per_step / clients, ready_s=ready_s,
                 rss_mib=rss_mib)
    print(f"{label}: 1 client {one['tokens_per_s']:.1f} tok/s, {clients} clients {many['tokens_per_s']:.1f} "
          f"tok/s ({many['tokens_per_s'] / one['tokens_per_s']:.1f}x), TTFT p50 {many['ttft_p50_ms']:.0f} ms, "
          f"ready {ready_s:.1f} s, RSS {rss_mib:.0f} MiB", flush=True)
    return [one, many]


def markdown(result: dict) -> str:
    md = ["# neoxrt serve (Pythia-160m shape, random weights, CPU)", "",
          f"{result['prompt_tokens']}-token prompts, {result['new_tokens']} new tokens (SSE streaming), ONNX Runtime "
          f"{result['threads']} threads; {result['machine']}. vLLM: {result['vllm']}.",
          "", "| server | clients | requests | tokens/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms "
          "| occupancy | ready s | RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        md.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                  f"{r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | "
                  f"{'-' if r['occupancy'] is None else format(r['occupancy'], '.2f')} | "
                  f"{r['ready_s']:.1f} | {r['rss_mib']:.0f} |")
    md += ["", "## Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
    measured = {r["server"]: r["tokens_per_s"] for r in result["rows"] if r["server"].startswith("vLLM")
                and r["clients"] > 1}
    for label in dict.fromkeys(r["server"] for r in result["rows"] if r["server"].startswith("neoxrt")):
        one, many = [r for r in result["rows"] if r["server"] == label]
        against = "vLLM fp32" if "fp32" in label else "vLLM bf16"
        checks = [(f"{label}: {many['clients']} clients / 1 client tokens/s", many["tokens_per_s"] / one["tokens_per_s"],
                   f">= {TARGETS['speedup']}", many["tokens_per_s"] / one["tokens_per_s"] >= TARGETS["speedup"]),
                  (f"{label}: TTFT p50 at {many['clients']} clients (ms)", many["ttft_p50_ms"],
                   f"<= {TARGETS['ttft_p50_ms']:.0f}", many["ttft_p50_ms"] <= TARGETS["ttft_p50_ms"]),
                  *([(f"{label}: tokens/s at {many['clients']} clients vs {against} (this run)", many["tokens_per_s"],
                      f">= {measured[against]:.1f}", many["tokens_per_s"] >= measured[against])] if against in measured else []),
                  (f"{label}: server RSS (MiB)", many["rss_mib"], f"<= {TARGETS['rss_mib']:.0f}",
                   many["rss_mib"] <= TARGETS["rss_mib"]),
                  (f"{label}: ready (s)", many["ready_s"], f"<= {TARGETS['ready_s']:.0f}", many["ready_s"] <= TARGETS["ready_s"])]
        md += [f"| {name} | {value:.2f} | {limit} | {'yes' if ok else 'NO'} |" for name, value, limit, ok in checks]
    return "\n".join(md) + "\n"


def chart(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = result["rows"]
    labels = [f"{r['server'].replace(' weights-only', ' w-o')}, {r['clients']}" for r in rows]
    colors = ["tab:blue" if r["server"].startswith("neoxrt") else "tab:gray" for r in rows]
    a.bar(labels, [r["tokens_per_s"] for r in rows], color=colors)
    a.set_ylabel("tokens/s (aggregate)")
    b.bar(labels, [r["ttft_p50_ms"] for r in rows], color=colors)
    b.axhline(TARGETS["ttft_p50_ms"], color="tab:red", linestyle="--", label="target p50 TTFT")
    b.set_ylabel("TTFT p50 (ms)")
    b.set_yscale("log")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7, labelrotation=35)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle("server, clients: blue neoxrt, gray vLLM (same run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def common_args(p: argparse.ArgumentParser, port: int, requests_each: int) -> None:
    """The options every serving bench takes."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-each", type=int, default=requests_each, help="requests per concurrent client, back to back")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--root", default="artifacts/bench-serve")
    p.add_argument("--out", default="bench-results")


def write_results(out: Path, stem: str, result: dict, md: str) -> None:
    """`out/stem.json` and `out/stem.md`; the markdown printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neoxrt.bench.serve", description=__doc__.split("\n")[0])
    common_args(p, port=18400, requests_each=2)
    p.add_argument("--single-requests", type=int, default=4, help="requests of the one-client phase")
    p.add_argument("--artifacts", type=int, default=2, choices=(1, 2), help="1: fp32 only; 2: and INT8 weights-only")
    p.add_argument("--vllm-python", default=None, help="an interpreter with vllm-cpu installed (default: this one if it "
                   "imports vllm; none: no vLLM rows)")
    p.add_argument("--machine", default="quiet (no other jobs)", help="what else ran on the machine, for the report")
    add_results_flag(p, "serve")
    args = p.parse_args(argv)
    result = run(args)
    write_results(Path(args.out), "serve", result, markdown(result))
    chart(result, Path(args.out) / "serve.png")
    if args.results:
        publish(result, args.results, command_line("neoxrt.bench.serve", argv))
    return 0


COLUMNS = ["server", "clients", "requests", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "latency p50 ms", "latency p99 ms",
           "occupancy", "ready s", "RSS MiB"]


def publish(result: dict, name: str, command: str) -> Path:
    """docs/results/NAME.json: neoxrt's rows, vLLM's rows of the same run as the reference; the headline compares
    the concurrent phase with vLLM's at the same precision."""
    def cells(r):
        occupancy = None if r["occupancy"] is None else round(r["occupancy"], 2)
        return [r["server"], r["clients"], r["requests"], round(r["tokens_per_s"], 1), round(r["ttft_p50_ms"]),
                round(r["ttft_p99_ms"]), round(r["latency_p50_ms"]), round(r["latency_p99_ms"]), occupancy,
                round(r["ready_s"], 1), round(r["rss_mib"])]

    ours = [r for r in result["rows"] if not r["server"].startswith("vLLM")]
    theirs = {(r["server"], r["clients"]): r for r in result["rows"] if r["server"].startswith("vLLM")}
    headline = []
    for r in ours:
        ref = theirs.get(("vLLM fp32" if "fp32" in r["server"] else "vLLM bf16", r["clients"]))
        if ref and r["clients"] > 1:
            headline.append({"measure": f"serving, {r['clients']} streaming clients, Pythia-160m shape: tokens/s",
                             "neoxrt": f"{r['tokens_per_s']:.1f} ({r['server']})",
                             "reference": f"{ref['tokens_per_s']:.1f} ({ref['server']})",
                             "ratio": round(r["tokens_per_s"] / ref["tokens_per_s"], 2)})
    return write_result(name, "neoxrt serve against vLLM's CPU server: 1 client, then concurrent streaming clients",
                        COLUMNS, [cells(r) for r in ours], command=command, reference="vLLM's CPU server in the same run"
                        if theirs else "none (vLLM not run)", reference_rows=[cells(r) for r in theirs.values()],
                        headline=headline, notes=f"{result['prompt_tokens']}-token prompts, {result['new_tokens']} new "
                        f"tokens (SSE, ignore_eos, greedy), {result['threads']} threads; {result['machine']}.")


if __name__ == "__main__":
    sys.exit(main())
