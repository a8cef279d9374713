"""A real tritonserver (the one nvidia-pytriton bundles) on 127.0.0.1 for the serving tests: started once per
module through `neoxrt serve`, every wait bounded, stopped by pid."""

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
from serve_testing import children

from neox_testing import default_checkpoint
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions

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


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "default"
    export_checkpoint(default_checkpoint(), out, ExportOptions(attention="decomposed"), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    """`neoxrt serve` in a child process; its temporary folder under a fresh TMPDIR so a test can check it is
    gone. Stopped by pid (SIGTERM, then SIGKILL) at the end whatever the tests did."""
    pytest.importorskip("pytriton", reason="needs the [serve] extra (nvidia-pytriton)")
    tmpdir = tmp_path_factory.mktemp("serve-tmp")
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    argv = [sys.executable, "-m", "neoxrt.cli", "serve", str(artifact), "--http-port", str(http), "--grpc-port",
            str(grpc), "--metrics-port", str(metrics), "--threads", "2", "--max-batch", "16"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    srv = Server(proc, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}", "neoxrt", tmpdir,
                 artifact)
    deadline = time.monotonic() + READY_S
    while not srv.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"neoxrt serve not ready in {READY_S} s: {proc.stdout.read()[-2000:]}")
        time.sleep(0.2)
    yield srv
    if proc.poll() is None:
        for pid in children(proc.pid):
            _kill(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
