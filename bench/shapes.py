"""Benchmark model shapes (random, seeded weights) and where their checkpoints are cached."""

from __future__ import annotations

import shutil
from pathlib import Path

SHAPES = {
    "pythia-70m": dict(vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048),
    "pythia-160m": dict(vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


def shape_checkpoint(name: str, root: Path) -> Path:
    """A seeded random checkpoint of a benchmark shape (with the GPT-NeoX tokenizer), written once under `root`."""
    from neoxrt.assets import DEFAULT_TOKENIZER
    from neoxrt.model import NeoXConfig, random_model, save_checkpoint

    folder = Path(root) / f"{name}-random"
    if not (folder / "model.safetensors").is_file():
        save_checkpoint(random_model(NeoXConfig(**SHAPES[name]), seed=0), folder)
    if not (folder / "tokenizer.json").is_file():  # the GPT-NeoX tokenizer, so calibration has text to read
        shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    return folder


def fresh(folder: Path) -> bool:
    """Whether `folder` holds an artifact whose graph is the form this neoxrt exports (the benches re-make a
    cached artifact that is missing or older: exporter.GRAPH_VERSION)."""
    import json

    from neoxrt.export.exporter import GRAPH_VERSION

    manifest = Path(folder) / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("graph_version") == GRAPH_VERSION


def exported(checkpoint: Path, folder: Path, options: dict) -> Path:
    """`folder`: `checkpoint` exported with `options` (ExportOptions' fields), once (re-made when missing or stale)."""
    if not fresh(folder):
        from neoxrt.export.exporter import export_checkpoint
        from neoxrt.export.options import ExportOptions

        export_checkpoint(checkpoint, folder, ExportOptions(**options), force=True, log=lambda *_: None)
    return folder


def calibrated(src: Path, out: Path, options: dict) -> Path:
    """`out`: the artifact `src` calibrated with `options` (CalibrationOptions' fields), once; a stale one is
    re-made with a fresh calibration (its calibration cache was made for the old source graph)."""
    if not fresh(out):
        from neoxrt.calibration.calibrate import calibrate_artifact
        from neoxrt.calibration.options import CalibrationOptions

        calibrate_artifact(src, out, CalibrationOptions(**options), force=True, recalibrate=True, progress=False,
                           log=lambda *_: None)
    return out
