"""`make demo`: the real pipeline on the embedded default model -- export to ONNX, generate with ONNX
Runtime, and show how the tokens agree with the PyTorch model."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The state of the Union is", "Gentlemen of the Senate and House of Representatives:"]
NEW_TOKENS = 48


def pytorch_greedy(model, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuation with the PyTorch model, one prompt at a time (the reference)."""
    import torch

    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            mask, pos = torch.ones_like(ids), torch.arange(len(row))[None]
            logits, past = model(ids, pos, mask, model.empty_past(1))
            new = []
            for _ in range(new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                new.append(int(nxt))
                mask, pos = torch.cat([mask, torch.ones_like(nxt)], 1), pos[:, -1:] + 1
                logits, past = model(nxt, pos, mask, past)
            out.append(new)
    return out


def main(out_dir: str | None = None) -> int:
    from neoxrt.assets import DEFAULT_MODEL_DIR
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import ExportOptions
    from neoxrt.model import load_model
    from neoxrt.runtime import Generator

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(out_dir or Path(tmp) / "default-fp32")
        export_checkpoint(DEFAULT_MODEL_DIR, artifact, ExportOptions(), force=True)
        generator = Generator.from_artifacts(artifact)
        start = time.perf_counter()
        result = generator.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        seconds = time.perf_counter() - start
        reference = pytorch_greedy(load_model(DEFAULT_MODEL_DIR), generator.encode(PROMPTS), NEW_TOKENS)
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
