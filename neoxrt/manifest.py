"""`manifest.json`: what every artifact folder says about where it came from, checked before use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from neoxrt import __version__
from neoxrt.contract import MANIFEST_FILE
from neoxrt.errors import ArtifactError

# session config entries an artifact asks ONNX Runtime to use ({key: value}, both strings)
ORT_SESSION_CONFIG = "onnxruntime_session_config"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, stage: str, body: dict, files: list[str]) -> dict:
    """Write folder/manifest.json with the toolkit version, the stage and the sha256 of `files`."""
    manifest = {
        "toolkit": "neoxrt",
        "toolkit_version": __version__,
        "stage": stage,
        **body,
        "files": {name: file_sha256(folder / name) for name in files},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: Path, stages: tuple[str, ...], verify_files: bool = True) -> dict:
    """Read and check an artifact's manifest.

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
    if manifest.get("stage") not in stages:
        raise ArtifactError(f"artifact {folder}: expected stage {' or '.join(stages)}, found {manifest.get('stage')!r}")
    version = manifest.get("toolkit_version")
    if version != __version__:
        raise ArtifactError(
            f"artifact {folder}: made by neoxrt {version}, this is neoxrt {__version__}; export it again"
        )
    config = manifest.get(ORT_SESSION_CONFIG, {})
    if not isinstance(config, dict) or not all(isinstance(v, str) for kv in config.items() for v in kv):
        raise ArtifactError(f"artifact {folder}: manifest {ORT_SESSION_CONFIG} must map strings to strings, got {config!r}")
    if verify_files:
        for name, digest in manifest.get("files", {}).items():
            file = folder / name
            if not file.is_file():
                raise ArtifactError(f"artifact {folder}: {name} listed in the manifest is missing")
            if file_sha256(file) != digest:
                raise ArtifactError(f"artifact {folder}: {name} does not match its manifest (sha256 differs)")
    return manifest


def precision_of(manifest: dict) -> str:
    """fp32, fp16 or int8: what an artifact computes in (an engine records it; INT8 artifacts are stage calibrate)."""
    if "precision" in manifest:
        return manifest["precision"]
    if manifest.get("stage") == "calibrate":
        return "int8"
    return manifest.get("export_options", {}).get("dtype", "fp32")
