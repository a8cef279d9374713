"""`make demo`: the main job on the embedded default model, end to end."""

from __future__ import annotations

import sys

PROMPT = "The state of the Union is"


def main() -> int:
    import torch
    from tokenizers import Tokenizer

    from neoxrt.assets import DEFAULT_MODEL_DIR, DEFAULT_TOKENIZER
    from neoxrt.model import load_model

    tokenizer = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    model = load_model(DEFAULT_MODEL_DIR)
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1])[None]
    new = []
    with torch.no_grad():
        logits, past = model(ids, pos, mask, model.empty_past(1))
        for _ in range(32):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            new.append(int(nxt))
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = pos[:, -1:] + 1
            logits, past = model(nxt, pos, mask, past)
    print(f"[pytorch] {PROMPT}{tokenizer.decode(new)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
