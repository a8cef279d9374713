"""`neoxrt triton-repo`: a classic Triton model repository for an artifact (ONNX or TensorRT engine folder).

    REPO/NAME/config.pbtxt        Python backend, decoupled (streaming), the I/O of `neoxrt.serve.request`
    REPO/NAME/1/model.py          `neoxrt.serve.model`: loads the artifact with our runtime and scheduler
    REPO/NAME/1/artifact/         the artifact folder (copied; `neoxrt serve` links it instead)

The same folder runs in NVIDIA's Triton container once neoxrt is installed there (docs/serving.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from neoxrt.errors import NeoxrtError
from neoxrt.fsutil import atomic_dir
from neoxrt.manifest import read_manifest
from neoxrt.serve.request import INPUTS, OUTPUTS, Field

ARTIFACT_DIR = "artifact"


class ServeError(NeoxrtError):
    """A model repository or the server cannot be set up or started."""


@dataclass(frozen=True)
class RepoOptions:
    name: str = "neoxrt"
    max_batch: int = 16  # rows decoded together (in-flight batching)
    max_queue: int = 64  # requests waiting beyond those; more get a busy error
    threads: int = 0  # ONNX Runtime intra-op threads (0: all cores)
    openai_port: int = 0  # the OpenAI-compatible endpoint, in the model's own process (0: off)
    openai_host: str = "127.0.0.1"
    kv_cache_memory: float = 0.0  # GiB for the KV-cache pool (static-cache artifacts; 0: kv_pool.default_memory)
    max_prefill_tokens: int = 256  # prompt tokens computed per scheduler step (chunked prefill)
    prefix_cache: bool = True  # reuse cached prompt prefixes (the pool)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or self.name.startswith("."):
            raise ServeError(f"--name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.max_batch < 1 or self.max_queue < 0 or self.threads < 0:
            raise ServeError(f"--max-batch must be >= 1, --max-queue and --threads >= 0, got {self.max_batch}, "
                             f"{self.max_queue}, {self.threads}")
        if not self.kv_cache_memory >= 0 or self.max_prefill_tokens < 1:
            raise ServeError(f"--kv-cache-memory must be >= 0 GiB (0: the default) and --max-prefill-tokens >= 1, got "
                             f"{self.kv_cache_memory} and {self.max_prefill_tokens}")
        if not 0 <= self.openai_port <= 65535 or not self.openai_host or '"' in self.openai_host:
            raise ServeError(f"--openai-port must be in [0, 65535] (0: off) with a host address, got "
                             f"{self.openai_host!r}:{self.openai_port}")


def config_pbtxt(options: RepoOptions) -> str:
    def tensor(f: Field) -> str:
        optional = " optional: true" if f.optional else ""
        return f'  {{ name: "{f.name}" data_type: {f.triton_type} dims: [ {", ".join(map(str, f.dims))} ]{optional} }}'

    params = {"artifact": ARTIFACT_DIR, "max_batch": options.max_batch, "max_queue": options.max_queue,
              "threads": options.threads, "openai_host": options.openai_host, "openai_port": options.openai_port,
              "kv_cache_memory": options.kv_cache_memory, "max_prefill_tokens": options.max_prefill_tokens,
              "prefix_cache": int(options.prefix_cache)}
    return "\n".join([
        f'name: "{options.name}"',
        'backend: "python"',
        "max_batch_size: 0  # batching is the model's own (in-flight), not Triton's dynamic batcher",
        "model_transaction_policy { decoupled: true }",
        "input [", ",\n".join(tensor(f) for f in INPUTS), "]",
        "output [", ",\n".join(tensor(Field(f.name, f.triton_type, f.dims, optional=False)) for f in OUTPUTS), "]",
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        *(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()),
        "",
    ])


def write_model_repository(artifact: Path, repo: Path, options: RepoOptions, force: bool = False,
                           link: bool = False) -> Path:
    """Write REPO (atomically) for `artifact`; `link` symlinks the artifact instead of copying it.

    Returns the model folder REPO/NAME.

    Raises:
        ArtifactError: the artifact is not an export, calibrate or build folder, or its files do not match.
        ServeError: REPO exists without `force`.
    """
    artifact = Path(artifact).resolve()
    read_manifest(artifact, ("export", "calibrate", "build"))
    with atomic_dir(Path(repo), force, ServeError) as tmp:
        version = tmp / options.name / "1"
        version.mkdir(parents=True)
        (tmp / options.name / "config.pbtxt").write_text(config_pbtxt(options))
        shutil.copyfile(Path(__file__).with_name("model.py"), version / "model.py")
        if link:
            os.symlink(artifact, version / ARTIFACT_DIR)
        else:
            shutil.copytree(artifact, version / ARTIFACT_DIR)
    return Path(repo) / options.name
