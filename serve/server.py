"""`neoxrt serve`: the `tritonserver` bundled with nvidia-pytriton, run as our own child process on a
classic model repository in a temporary folder, managed by its pid.

What the bundled server needs (each found the hard way, see docs/serving.md):
- a backend folder with the Python backend and the stub built for this interpreter's version;
- the stub runs the `python3` first on PATH: this interpreter's bin folder goes first;
- the stub must load this interpreter's libpython, not the system's: its LIBDIR goes first on LD_LIBRARY_PATH,
  then the libraries the wheel bundles;
- PyTriton's own `serve()` ignores SIGTERM, so we do not use it: SIGTERM or SIGINT here stop the child
  (SIGTERM, then SIGKILL of its process group after a grace period), remove the shared-memory regions named
  with our prefix, and the temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from neoxrt.serve.repository import RepoOptions, ServeError, write_model_repository

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout: float = 120.0
    stop_timeout: float = 8.0  # SIGTERM grace before SIGKILL (clean exit within 10 s in all)


def triton_dist() -> Path:
    """The tritonserver distribution inside the nvidia-pytriton wheel (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("the bundled Triton server is not installed: pip install 'neoxrt[serve]' (nvidia-pytriton)")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServeError(f"expected {dist}/bin/tritonserver from nvidia-pytriton; not found")
    return dist


def prepare_backends(dist: Path, folder: Path) -> Path:
    """A backend folder for the Python backend with the stub of this interpreter's version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise ServeError(f"the bundled Triton has Python backend stubs for {', '.join(have)}, not Python {version}")
    python = folder / "python"
    python.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            os.symlink(item, python / item.name)
    shutil.copy2(stub, python / stub.name)
    return folder


def server_env(dist: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
    return env


def http_ok(url: str, timeout: float) -> bool:
    """Whether GET `url` answers 200 (a server's health or readiness endpoint); False while it cannot connect."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class TritonProcess:
    """One `tritonserver` child on `repo`, its log in `log_path`."""

    def __init__(self, repo: Path, workdir: Path, options: ServerOptions):
        self.options, self.workdir = options, workdir
        self.dist = triton_dist()
        self.shm_prefix = f"neoxrt_{os.getpid()}_{int(time.time() * 1000) % 10**8}_"
        backends = prepare_backends(self.dist, workdir / "backends")
        self.log_path = workdir / "tritonserver.log"
        o = options
        self.argv = [str(self.dist / "bin" / "tritonserver"), f"--model-repository={repo}",
                     f"--backend-directory={backends}", f"--cache-directory={self.dist / 'caches'}",
                     f"--http-address={o.host}", f"--grpc-address={o.host}", f"--metrics-address={o.host}",
                     f"--http-port={o.http_port}", f"--grpc-port={o.grpc_port}", f"--metrics-port={o.metrics_port}",
                     "--allow-metrics=true", "--allow-cpu-metrics=true", "--exit-timeout-secs=5",
                     f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.options.http_port}"

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_env(self.dist), cwd=self.workdir, start_new_session=True)
        log.close()

    def wait_ready(self, stop: StopFlag | None = None) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            if self.proc.poll() is not None:
                raise ServeError(f"tritonserver exited with code {self.proc.returncode} before it was ready: "
                                 f"{self.log_tail()}")
            if http_ok(f"{self.http_url}/v2/health/ready", timeout=1):
                return
            time.sleep(0.1)
        if not (stop and stop.is_set()):
            raise ServeError(f"tritonserver not ready after {self.options.ready_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 6) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL the process group if needed; remove our shared-memory regions. Returns the
        server's exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.options.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:  # stubs left by a killed server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for region in SHM_DIR.glob(f"{self.shm_prefix}*") if SHM_DIR.is_dir() else ():
            region.unlink(missing_ok=True)
        return self.proc.returncode


def cache_line(artifact: Path) -> str:
    """How the scheduler will keep this artifact's cache (one line for the user)."""
    from neoxrt import contract as io
    from neoxrt.manifest import read_manifest

    manifest = read_manifest(artifact, ("export", "calibrate", "build"), verify_files=False)
    if any(t["name"] == io.WRITE_INDICES for t in manifest["io"]["inputs"]):
        from neoxrt.runtime.pool_graph import pool_form

        model = artifact / io.MODEL_FILE  # absent from an engine folder: its pool is in device memory
        form = pool_form(model) if model.is_file() else "engine"
        attention = {"gqa": "GroupQueryAttention over each row's own slots",
                     "export": "the exported graph's attention over the pool's width",
                     "engine": "the TensorRT engine's, the pool in device memory"}[form]
        return (f"neoxrt serve: KV-cache pool (static cache): chunked prefill, prefix reuse, admission by memory; "
                f"attention: {attention}")
    return ("neoxrt serve: this artifact has a dynamic cache (--kv-cache dynamic, or not the causal LM with fused "
            "attention): the portable path, the cache copied each step; export with the defaults for the KV-cache pool")


class StopFlag:
    """Set from a signal handler. Not a `threading.Event`: its `set()` takes a lock that the interrupted main
    thread may hold inside `Event.wait()`, and the handler then waits for itself forever (seen: SIGTERM ignored)."""

    def __init__(self) -> None:
        self.flag = False

    def set(self, *_) -> None:
        self.flag = True

    def is_set(self) -> bool:
        return self.flag


def serve(artifact: Path, repo_options: RepoOptions, options: ServerOptions, announce=print) -> int:
    """Run the server until SIGTERM or SIGINT (or until it exits); returns 0 on a signalled stop.

    Raises:
        ServeError: the bundled server is missing or does not get ready.
        ArtifactError: the artifact cannot be served.
    """
    ports = (options.http_port, options.grpc_port, options.metrics_port, repo_options.openai_port or None)
    if len(set(ports) - {None}) < len([p for p in ports if p]):
        raise ServeError(f"--http-port, --grpc-port, --metrics-port and --openai-port must differ, got "
                         f"{', '.join(str(p) for p in ports if p)}")
    stop = StopFlag()
    previous = {sig: signal.signal(sig, stop.set) for sig in (signal.SIGTERM, signal.SIGINT)}
    workdir = Path(tempfile.mkdtemp(prefix="neoxrt-serve-"))
    server = None
    try:
        write_model_repository(artifact, workdir / "repo", repo_options, link=True)
        server = TritonProcess(workdir / "repo", workdir, options)
        server.start()
        server.wait_ready(stop)
        if not stop.is_set():
            o, name = options, repo_options.name
            openai = (f", OpenAI http://{o.host}:{repo_options.openai_port}/v1" if repo_options.openai_port else "")
            announce(f"neoxrt serve: ready. HTTP {server.http_url}/v2/models/{name}/generate (and /generate_stream), "
                     f"gRPC {o.host}:{o.grpc_port}, metrics http://{o.host}:{o.metrics_port}/metrics{openai}")
            announce(cache_line(artifact))
            sys.stdout.flush()
        while not stop.is_set():
            time.sleep(0.2)  # a signal interrupts the sleep; its handler only sets the flag
            if server.proc.poll() is not None:
                raise ServeError(f"tritonserver exited with code {server.proc.returncode}: {server.log_tail()}")
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
