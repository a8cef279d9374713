"""Calibration data: text files -> token ids -> a seeded sample of non-overlapping windows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from neoxrt.errors import CalibrationError


def read_texts(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, text) per file; missing, unreadable or empty files are errors."""
    if not paths:
        raise CalibrationError("no calibration data: pass --data FILE (text)")
    out = []
    for path in map(Path, paths):
        if not path.is_file():
            raise CalibrationError(f"--data {path}: file not found (expected a UTF-8 text file)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"--data {path}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
        if not text.strip():
            raise CalibrationError(f"--data {path}: the file is empty (expected text to calibrate on)")
        out.append((path, text))
    return out


def data_fingerprint(texts: list[tuple[Path, str]]) -> list[dict]:
    return [{"file": path.name, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()} for path, text in texts]


def calibration_windows(texts: list[tuple[Path, str]], tokenizer, samples: int, seq_len: int, seed: int,
                        eos_id: int | None = None) -> np.ndarray:
    """[N, seq_len] int64: the files tokenised and joined (EOS between files), cut into non-overlapping
    windows, `samples` of them drawn without replacement with `seed`.

    Raises:
        CalibrationError: fewer tokens than one window.
    """
    ids: list[int] = []
    for _, text in texts:
        if ids and eos_id is not None:
            ids.append(eos_id)
        ids += tokenizer.encode(text).ids
    available = len(ids) // seq_len
    if available < 1:
        raise CalibrationError(f"calibration data has {len(ids)} tokens; need at least one window of "
                               f"--seq-len {seq_len}")
    windows = np.asarray(ids[: available * seq_len], np.int64).reshape(available, seq_len)
    pick = np.random.default_rng(seed).choice(available, size=min(samples, available), replace=False)
    return windows[np.sort(pick)]
