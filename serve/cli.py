"""`neoxrt serve` and `neoxrt triton-repo`. Building these parsers imports nothing beyond the standard
library, so `neoxrt serve` never loads onnx or torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from neoxrt import cli_types as t

COMMANDS = ("serve", "triton-repo")


def _repo_options(args: argparse.Namespace):
    from neoxrt.serve.repository import RepoOptions

    return RepoOptions(name=args.name, max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads,
                       openai_port=args.openai_port, openai_host=getattr(args, "host", "127.0.0.1"),
                       kv_cache_memory=args.kv_cache_memory, max_prefill_tokens=args.max_prefill_tokens,
                       prefix_cache=not args.no_prefix_cache)


def _cmd_triton_repo(args: argparse.Namespace) -> int:
    from neoxrt.serve.repository import write_model_repository

    model = write_model_repository(Path(args.artifact), Path(args.repo_dir), _repo_options(args), force=args.force)
    print(f"wrote {model} (tritonserver --model-repository {args.repo_dir})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from neoxrt.serve.server import ServerOptions, serve

    options = ServerOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                            metrics_port=args.metrics_port)
    return serve(Path(args.artifact), _repo_options(args), options)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="neoxrt", help="model name in Triton's URLs (default neoxrt)")
    p.add_argument("--max-batch", type=t.positive_int, default=16, help="rows decoded together, in-flight (default 16)")
    p.add_argument("--max-queue", type=t.count, default=64, help="requests waiting beyond those; more are refused (64)")
    p.add_argument("--threads", type=t.count, default=0, help="ONNX Runtime intra-op threads (default 0: all cores)")
    p.add_argument("--kv-cache-memory", type=t.nonnegative_float, default=0.0, metavar="GIB",
                   help="GiB of KV-cache pool, allocated at start (static-cache artifacts: the export default); "
                        "default 0: what --max-batch rows of the whole context need, at most a quarter of the "
                        "memory available at start (a TensorRT engine: device memory, at most half the free)")
    p.add_argument("--max-prefill-tokens", type=t.positive_int, default=256,
                   help="prompt tokens computed per step; longer prompts are chunked between decode steps (256)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the cached keys and values of prompt prefixes seen before")
    p.add_argument("--openai-port", type=int, default=0,
                   help="also serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) on "
                        "this port, on the same scheduler as the Triton model (default 0: off)")


def _add_triton_repo(sub) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton model repository (Python backend, streaming) for an artifact")
    p.add_argument("artifact", help="artifact folder (neoxrt export, calibrate or build)")
    p.add_argument("repo_dir", help="model repository folder to write (atomically)")
    _model_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing repository folder")
    p.set_defaults(func=_cmd_triton_repo)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an artifact with the bundled Triton server (HTTP, gRPC, streaming)")
    p.add_argument("artifact", help="artifact folder (neoxrt export, calibrate or build)")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=t.port, default=8000)
    p.add_argument("--grpc-port", type=t.port, default=8001)
    p.add_argument("--metrics-port", type=t.port, default=8002)
    p.set_defaults(func=_cmd_serve)


ADDERS: list = [_add_serve, _add_triton_repo]
