"""Helpers of the serving tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


READY_S = 90


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Server:
    proc: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    name: str
    tmpdir: Path
    artifact: Path
    openai: str | None = None  # base URL of the OpenAI-compatible endpoint, when started with it

    def post(self, path: str, body: dict, timeout: float = 60) -> tuple[int, str]:
        req = urllib.request.Request(f"{self.http}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def generate(self, **body) -> tuple[int, dict]:
        status, text = self.post(f"/v2/models/{self.name}/generate", body)
        return status, json.loads(text)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


def start_server(artifact: Path, tmpdir: Path, openai: bool = False, extra: tuple[str, ...] = ()) -> Server:
    """`neoxrt serve ARTIFACT` on free ports of 127.0.0.1 (and the OpenAI endpoint with `openai`; `extra`: more
    options), ready."""
    pytest.importorskip("pytriton", reason="needs the [serve] extra (nvidia-pytriton)")
    http, grpc, metrics, oai = free_ports(4)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    argv = [sys.executable, "-m", "neoxrt.cli", "serve", str(artifact), "--http-port", str(http), "--grpc-port",
            str(grpc), "--metrics-port", str(metrics), "--threads", "2", "--max-batch", "16"]
    argv += (["--openai-port", str(oai)] if openai else []) + list(extra)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    srv = Server(proc, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}", "neoxrt", tmpdir,
                 artifact, f"http://127.0.0.1:{oai}/v1" if openai else None)
    deadline = time.monotonic() + READY_S
    while not srv.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"neoxrt serve not ready in {READY_S} s: {proc.stdout.read()[-2000:]}")
        time.sleep(0.2)
    return srv


def stop_server(srv: Server) -> None:
    """SIGKILL the server's descendants and itself, by pid (tests of a clean stop send SIGTERM themselves)."""
    if srv.proc.poll() is None:
        for pid in children(srv.proc.pid):
            _kill(pid)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
