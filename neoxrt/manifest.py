"""`manifest.json`: what every artifact folder says about where it came from, checked before use.

Integrity, at a cost that does not grow with the model:
- `files` holds every file's sha256, computed while the file was written (no second read);
- `file_checks` holds, for files past `FULL_HASH_BYTES`, their size and a sampled digest (64 blocks of
  64 KiB spread over the file): loading checks those (milliseconds for a 41 GB file) and hashes small files in
  full; `neoxrt verify` (`read_manifest(..., full=True)`) re-hashes everything. A changed size, a changed
  sampled block or a changed small file is refused before it is used.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from neoxrt import __version__
from neoxrt.contract import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TASKS,
    TEXT_GENERATION,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from neoxrt.errors import ArtifactError

# session config entries an artifact asks ONNX Runtime to use ({key: value}, both strings)
ORT_SESSION_CONFIG = "onnxruntime_session_config"
FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed in full at every load
SAMPLES, SAMPLE_BYTES = 64, 64 << 10


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """sha256 over the file's size and `SAMPLES` blocks at evenly spread offsets (first and last included)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    last = max(0, size - SAMPLE_BYTES)
    with path.open("rb") as handle:
        for i in range(SAMPLES):
            handle.seek(last * i // (SAMPLES - 1))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def write_manifest(folder: Path, stage: str, body: dict, files: list[str], digests: dict[str, str] | None = None) -> dict:
    """Write folder/manifest.json with the toolkit version, the stage and the integrity of `files`.

    Args:
        digests: sha256 already computed while writing ({file name: hex}); the other files are hashed here.
    """
    digests = digests or {}
    large = [name for name in files if (folder / name).stat().st_size > FULL_HASH_BYTES]
    manifest = {
        "toolkit": "neoxrt",
        "toolkit_version": __version__,
        "stage": stage,
        **body,
        "files": {name: digests.get(name) or file_sha256(folder / name) for name in files},
        "file_checks": {name: {"bytes": (folder / name).stat().st_size, "sampled_sha256": sampled_sha256(folder / name)}
                        for name in large},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: Path, stages: tuple[str, ...], verify_files: bool = True, full: bool = False) -> dict:
    """Read and check an artifact's manifest.

    Args:
        verify_files: check the files against the manifest (size and sampled digest for large files, sha256
            for the others).
        full: sha256 of every file, large ones too (`neoxrt verify`).

    Raises:
        ArtifactError: no manifest, another stage, another toolkit version, a malformed ONNX Runtime session
            config, or files that do not match.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    if not path.is_file():
        raise ArtifactError(f"artifact {folder}: no {MANIFEST_FILE} (expected the output of `neoxrt export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} must be a JSON object, found {type(manifest).__name__}")
    if manifest.get("stage") not in stages:
        raise ArtifactError(f"artifact {folder}: expected stage {' or '.join(stages)}, found {manifest.get('stage')!r}")
    check_schema(folder, manifest)
    version = manifest.get("toolkit_version")
    if version != __version__:
        raise ArtifactError(
            f"artifact {folder}: made by neoxrt {version}, this is neoxrt {__version__}; export it again"
        )
    check_sections(folder, manifest)
    config = manifest.get(ORT_SESSION_CONFIG, {})
    if not isinstance(config, dict) or not all(isinstance(v, str) for kv in config.items() for v in kv):
        raise ArtifactError(f"artifact {folder}: manifest {ORT_SESSION_CONFIG} must map strings to strings, got {config!r}")
    if verify_files or full:
        verify_manifest_files(folder, manifest, full)
    return manifest


def changed_files(folder: Path, manifest: dict) -> list[dict]:
    """Every file whose sha256 differs from the manifest's (or that is missing), with both hashes."""
    changed = []
    for name, digest in manifest.get("files", {}).items():
        file = folder / name
        found = file_sha256(file) if file.is_file() else "missing"
        if found != digest:
            changed.append({"file": name, "manifest_sha256": digest, "found_sha256": found})
    return changed


# what every manifest must hold, and of which type, before anything reads it
REQUIRED = {"stage": str, "toolkit_version": str, "files": dict, "config": dict, "io": dict}


def check_schema(folder: Path, manifest) -> None:
    """Required keys and types (the integrity section `files` included: removing it does not skip the check).

    Raises:
        ArtifactError: naming the first missing or mistyped key.
    """
    for key, kind in REQUIRED.items():
        if key not in manifest:
            raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} lacks {key!r}")
        if not isinstance(manifest[key], kind):
            raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} {key!r} must be a {kind.__name__}, "
                                f"found {type(manifest[key]).__name__}")
    for side in ("inputs", "outputs"):
        specs = manifest["io"].get(side)
        if not isinstance(specs, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in specs):
            raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} io.{side} must be a list of tensor specs with names")


# NeoXConfig.to_dict() as manifests record it (neoxrt.model is not imported: the runtime is torch-free)
_POSITIVE, _NUMBER, _TOKEN = "a positive integer", "a finite number", "a token id or null"
CONFIG_FIELDS = {
    "vocab_size": _POSITIVE, "hidden_size": _POSITIVE, "num_layers": _POSITIVE, "num_heads": _POSITIVE,
    "intermediate_size": _POSITIVE, "max_position_embeddings": _POSITIVE, "rotary_pct": _NUMBER,
    "rotary_base": _NUMBER, "rope_type": str, "rope_factor": _NUMBER, "layer_norm_eps": _NUMBER,
    "use_parallel_residual": bool, "hidden_act": str, "attention_bias": bool, "tie_word_embeddings": bool,
    "bos_token_id": _TOKEN, "eos_token_id": _TOKEN,
}
# keys that some stages write: when present, of this type
OPTIONAL = {"toolkit": str, "checkpoint": str, "checkpoint_sha256": str, "export_options": dict, "opset": int,
            "dynamic_axes": dict, "task": str, "id2label": dict, "file_checks": dict, "plugin": dict, "source": dict,
            "calibration": dict, "quantization": dict, "precision": str, "build_options": dict, "profiles": dict,
            "profile_order": list, "engine": dict}
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
# the files a later stage or the runtime reads: present in the folder means listed in `files` (and so checked)
ARTIFACT_FILES = (MODEL_FILE, WEIGHTS_FILE, TOKENIZER_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, "model.engine")


def _kind_ok(value, kind, vocab) -> bool:
    if kind == _POSITIVE:
        return type(value) is int and value > 0
    if kind == _NUMBER:
        return type(value) in (int, float) and math.isfinite(value)
    if kind == _TOKEN:
        return value is None or type(value) is int and (type(vocab) is not int or 0 <= value < vocab)
    return type(value) is kind if kind in (int, bool) else isinstance(value, kind)


def _field(folder: Path, key: str, value, kind, vocab=None) -> None:
    if not _kind_ok(value, kind, vocab):
        what = kind if isinstance(kind, str) else {str: "a string", dict: "an object", list: "a list", int: "an integer",
                                                   bool: "true or false"}[kind]
        raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} {key!r} must be {what}, found {value!r:.80}")


def check_sections(folder: Path, manifest: dict) -> None:
    """The sections' insides, once the version is ours: every config field, every io tensor spec (name, dtype,
    shape), the optional keys' types, and `files` (plain file names with sha256 strings, listing the stage's
    model and every artifact file in the folder: an entry removed beside a changed file is refused).

    Raises:
        ArtifactError: naming the first bad field (`config.vocab_size`, `io.inputs[2].shape`, `files`).
    """
    for key, kind in OPTIONAL.items():
        if key in manifest:
            _field(folder, key, manifest[key], kind)
    if manifest.get("task", TEXT_GENERATION) not in TASKS:  # an empty task read as "a  export" (found by fuzzing)
        raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} 'task' must be one of {', '.join(TASKS)}, "
                            f"found {manifest['task']!r:.80}")
    config = manifest["config"]
    for key, kind in CONFIG_FIELDS.items():
        if key not in config:
            raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} lacks 'config.{key}'")
        _field(folder, f"config.{key}", config[key], kind, config.get("vocab_size"))
    for side in ("inputs", "outputs"):
        if not manifest["io"][side]:
            raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} io.{side} is empty; expected the graph's tensors")
        for i, spec in enumerate(manifest["io"][side]):
            where = f"io.{side}[{i}]"
            if spec.get("dtype") not in TENSOR_DTYPES:
                raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} '{where}.dtype' must be one of "
                                    f"{', '.join(TENSOR_DTYPES)}, found {spec.get('dtype')!r:.80}")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(type(d) is str or type(d) is int and d >= 0 for d in shape):
                raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} '{where}.shape' must be a list of axis names "
                                    f"and sizes >= 0, found {shape!r:.80}")
    _check_files(folder, manifest)


def _check_files(folder: Path, manifest: dict) -> None:
    files = manifest["files"]
    for name, digest in files.items():
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} 'files' names {name!r:.80}; expected a file name "
                                "in the artifact folder")
        if not isinstance(digest, str):
            raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} 'files.{name}' must be a sha256 string, "
                                f"found {digest!r:.80}")
    model = "model.engine" if manifest["stage"] == "build" else MODEL_FILE
    if model not in files:
        raise ArtifactError(f"artifact {folder}: {MANIFEST_FILE} 'files' does not list {model}; expected its sha256")
    unlisted = [name for name in ARTIFACT_FILES if name not in files and (folder / name).exists()]
    if unlisted:
        raise ArtifactError(f"artifact {folder}: {unlisted[0]} is in the folder but not in {MANIFEST_FILE} 'files'; "
                            "expected every artifact file listed with its sha256")


def verify_manifest_files(folder: Path, manifest: dict, full: bool) -> None:
    """Check every file the manifest lists (see the module docstring for what is checked when).

    Raises:
        ArtifactError: a file is missing, or its size or digest differs, naming the file.
    """
    checks = manifest.get("file_checks", {})
    for name, digest in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"artifact {folder}: {name} listed in the manifest is missing")
        quick = checks.get(name) if isinstance(checks, dict) and not full else None
        if isinstance(quick, dict):  # anything else (removed, malformed): the full hash, never less
            size = file.stat().st_size
            if size != quick.get("bytes"):
                raise ArtifactError(f"artifact {folder}: {name} does not match its manifest "
                                    f"(expected {quick.get('bytes')} bytes, found {size})")
            if sampled_sha256(file) != quick.get("sampled_sha256"):
                raise ArtifactError(f"artifact {folder}: {name} does not match its manifest (sampled sha256 differs)")
        elif file_sha256(file) != digest:
            raise ArtifactError(f"artifact {folder}: {name} does not match its manifest (sha256 differs)")


def precision_of(manifest: dict) -> str:
    """fp32, fp16 or int8: what an artifact computes in (an engine records it; INT8 artifacts are stage calibrate)."""
    if "precision" in manifest:
        return manifest["precision"]
    if manifest.get("stage") == "calibrate":
        return "int8"
    return manifest.get("export_options", {}).get("dtype", "fp32")
