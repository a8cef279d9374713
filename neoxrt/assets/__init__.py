"""Paths of the embedded default model and text slices (see NOTICE.md for provenance and licences)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = ASSETS_DIR / "pythia-14m-sotu"
DEFAULT_TOKENIZER = DEFAULT_MODEL_DIR / "tokenizer.json"
EVAL_TEXT = ASSETS_DIR / "corpus" / "sotu-eval-slice.txt"
CALIBRATION_TEXT = ASSETS_DIR / "corpus" / "sotu-calibration-slice.txt"
