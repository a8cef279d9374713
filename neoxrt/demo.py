"""`make demo`: the real pipeline on the embedded default model -- export to ONNX, generate with ONNX
Runtime, and show how the tokens agree with the PyTorch model."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The state of the Union is", "Gentlemen of the Senate and House of Representatives:"]
NEW_TOKENS = 48


def main(out_dir: str | None = None) -> int:
    from neoxrt.assets import DEFAULT_MODEL_DIR
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import ExportOptions
    from neoxrt.model import load_model
    from neoxrt.model.generate import greedy
    from neoxrt.runtime import Generator

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(out_dir or Path(tmp) / "default-fp32")
        export_checkpoint(DEFAULT_MODEL_DIR, artifact, ExportOptions(), force=True)
        generator = Generator.from_artifacts(artifact)
        start = time.perf_counter()
        result = generator.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        seconds = time.perf_counter() - start
        rows = generator.encode(PROMPTS)
        model = load_model(DEFAULT_MODEL_DIR)
        reference = [greedy(model, [row], NEW_TOKENS)[0] for row in rows]
    print(f"\nONNX Runtime, greedy, {NEW_TOKENS} new tokens, batch of {len(PROMPTS)} in {seconds:.2f}s:")
    for prompt, text, ids, ref in zip(PROMPTS, result.text, result.ids, reference):
        print(f"  {prompt}{text}")
        print(f"    agreement with PyTorch: the first {_prefix(ids, ref)} of {len(ids)} tokens are identical")
    return 0 if all(ids == ref[: len(ids)] for ids, ref in zip(result.ids, reference)) else 1


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
