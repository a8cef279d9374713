"""Shared test helpers: tiny configs that span every supported variant, reference models, greedy loops."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from neoxrt.assets import DEFAULT_MODEL_DIR
from neoxrt.model import NeoXConfig, random_model, save_checkpoint

BASE = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
            max_position_embeddings=256)

# Every supported config variant has a tiny config here; tests/model/test_support_table.py checks that
# the variants below cover the support table in neoxrt.model.config.
VARIANTS: dict[str, NeoXConfig] = {
    "gelu_parallel": NeoXConfig(**BASE),
    "sequential_residual": NeoXConfig(**BASE, use_parallel_residual=False),
    "gelu_new": NeoXConfig(**BASE, hidden_act="gelu_new"),
    "gelu_fast": NeoXConfig(**BASE, hidden_act="gelu_fast"),
    "gelu_pytorch_tanh": NeoXConfig(**BASE, hidden_act="gelu_pytorch_tanh", use_parallel_residual=False),
    "relu": NeoXConfig(**BASE, hidden_act="relu"),
    "silu": NeoXConfig(**BASE, hidden_act="silu"),
    "no_attention_bias": NeoXConfig(**BASE, attention_bias=False),
    "tied_embeddings": NeoXConfig(**BASE, tie_word_embeddings=True),
    "head_dim_80": NeoXConfig(**{**BASE, "hidden_size": 160, "num_heads": 2}),  # Pythia-2.8b head size
    "head_dim_96_rotary_24": NeoXConfig(**{**BASE, "hidden_size": 192, "num_heads": 2}),  # NeoX-20B heads
    "full_rotary_eps": NeoXConfig(**BASE, rotary_pct=1.0, layer_norm_eps=1e-3, rotary_base=500.0),
    "linear_rope_scaling": NeoXConfig(**BASE, rope_type="linear", rope_factor=2.0),
}

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 3], [64, 65, 66, 67]]
FORMAT_CASES = [("safetensors", "fp32"), ("safetensors", "fp16"), ("sharded", "bf16"), ("bin", "fp32"), ("bin", "bf16"),
                ("sharded-bin", "fp16")]


def default_checkpoint() -> Path:
    return DEFAULT_MODEL_DIR


def write_variant(name: str, folder: Path, fmt: str = "safetensors", dtype: str = "fp32", seed: int = 0) -> Path:
    """A random checkpoint of VARIANTS[name] on disk."""
    return save_checkpoint(random_model(VARIANTS[name], seed=seed), folder, fmt=fmt, dtype=dtype)


def left_pad(prompts: list[list[int]], pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for a left-padded batch, positions as transformers makes them."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def with_fields(config: NeoXConfig, **changes) -> NeoXConfig:
    return dataclasses.replace(config, **changes)


def ort_session(proto_or_path, attention: str = "decomposed"):
    """An ONNX Runtime CPU session for an in-memory model or a path (plugin graphs via extensions)."""
    import onnx
    import onnxruntime as ort

    if attention == "plugin":
        from neoxrt.export.plugin_ref import onnxruntime_session_options, to_contrib_domain

        proto = proto_or_path if isinstance(proto_or_path, onnx.ModelProto) else onnx.load(str(proto_or_path))
        return ort.InferenceSession(to_contrib_domain(proto).SerializeToString(), onnxruntime_session_options(),
                                    providers=["CPUExecutionProvider"])
    source = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def step_pairs(session, model, prompts, decode_steps: int, kv_dtype="float32"):
    """Yield (step, mask, ort_logits, torch_logits, ort_presents, torch_presents) over a prompt step and
    `decode_steps` greedy decode steps, each side fed its own cache; next tokens come from PyTorch."""
    import numpy as np

    from neoxrt import contract as io

    cfg = model.config
    ids, mask, pos = left_pad(prompts)
    b = ids.shape[0]
    empty = np.zeros((b, cfg.num_heads, 0, cfg.head_dim), dtype=kv_dtype)
    ort_past = [(empty, empty) for _ in range(cfg.num_layers)]
    torch_past = model.empty_past(b)
    for step in range(decode_steps + 1):
        feeds = {io.INPUT_IDS: ids.numpy(), io.ATTENTION_MASK: mask.numpy(), io.POSITION_IDS: pos.numpy()}
        for i, (k, v) in enumerate(ort_past):
            feeds[io.past_key(i)], feeds[io.past_value(i)] = k, v
        out = session.run(None, feeds)
        ort_past = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(cfg.num_layers)]
        with torch.no_grad():
            logits, torch_past = model(ids, pos, mask, torch_past)
        yield step, mask, out[0], logits.numpy(), ort_past, [(k.numpy(), v.numpy()) for k, v in torch_past]
        ids = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        pos = pos[:, -1:] + 1


def greedy(model, prompts, new_tokens):
    """Our own greedy loop over the explicit KV cache (neoxrt.model.generate), new tokens as a tensor."""
    from neoxrt.model.generate import greedy as model_greedy

    return torch.tensor(model_greedy(model, prompts, new_tokens))


HEAD_ARCHITECTURES = {"text-classification": "GPTNeoXForSequenceClassification",
                      "token-classification": "GPTNeoXForTokenClassification",
                      "question-answering": "GPTNeoXForQuestionAnswering",
                      "feature-extraction": "GPTNeoXModel"}
LABELS = ("negative", "neutral", "positive")


def transformers_head(task: str, config: NeoXConfig | None = None, seed: int = 0, labels=LABELS):
    """A transformers GPT-NeoX head model of `task` with every weight random (LayerNorm and biases too)."""
    import transformers

    from neoxrt.model import config_to_hf

    config = config or VARIANTS["gelu_parallel"]
    hf = {**config_to_hf(config), "architectures": [HEAD_ARCHITECTURES[task]], "pad_token_id": None,
          "id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)},
          "attn_implementation": "eager"}
    torch.manual_seed(seed)
    model = getattr(transformers, HEAD_ARCHITECTURES[task])(transformers.GPTNeoXConfig(**hf)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def write_head(task: str, folder: Path, config: NeoXConfig | None = None, seed: int = 0, tokenizer: bool = False):
    """`transformers_head(...)` saved as a checkpoint (with the embedded model's tokenizer.json when asked: the
    config then needs its vocabulary); returns the transformers model, the reference."""
    import shutil

    model = transformers_head(task, config, seed)
    model.save_pretrained(folder)
    if tokenizer:
        shutil.copy(default_checkpoint() / "tokenizer.json", folder / "tokenizer.json")
    return model


TEXT_CONFIG = NeoXConfig(vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position_embeddings=64)  # the embedded tokenizer's vocabulary, 64 positions


HEAD_ROWS = [[5, 17, 33, 2, 90, 41, 7], [12, 3], [64], [64, 65, 66, 67]]  # one-token row: pooling at index 0


def head_reference(model, rows: list[list[int]]) -> list[dict]:
    """transformers' outputs for each row alone, unpadded: {output name: numpy} ([L], [S, L] or [S])."""
    names = {"GPTNeoXModel": ("last_hidden_state",), "GPTNeoXForQuestionAnswering": ("start_logits", "end_logits")}
    out = []
    for row in rows:
        with torch.no_grad():
            result = model(torch.tensor([row]))
        out.append({n: getattr(result, n)[0].numpy() for n in names.get(type(model).__name__, ("logits",))})
    return out


def padded(rows: list[list[int]], side: str, pad_id: int = 1):
    """(input_ids, attention_mask) int64 numpy [B, width], padded on `side` (left or right)."""
    import numpy as np

    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    return ids, mask


def head_errors(outputs: dict, reference: list[dict], mask) -> dict:
    """Max abs error per output between a padded batch's outputs ({name: array}) and each row's reference,
    over real tokens only."""
    import numpy as np

    errors = {}
    for name, value in outputs.items():
        value = np.asarray(value, np.float64)
        worst = 0.0
        for b, ref in enumerate(reference):
            got = value[b] if value.ndim == 2 and ref[name].ndim == 1 and name == "logits" else value[b][mask[b] == 1]
            assert got.shape == ref[name].shape, (name, got.shape, ref[name].shape)
            worst = max(worst, float(np.abs(got - ref[name]).max()))
        errors[name] = worst
    return errors


def speculative_artifacts(root: Path) -> dict[str, Path]:
    """The default model exported three ways ("fp32" dynamic cache, "static" cache, "last": --logits last),
    its INT8 weights-only artifact ("int8": a good draft) and a 1-layer random model with the same vocabulary
    and tokenizer ("wrong": a draft whose guesses are nearly all wrong)."""
    import shutil

    from neoxrt.calibration.calibrate import calibrate_artifact
    from neoxrt.calibration.options import CalibrationOptions
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import ExportOptions
    from neoxrt.model import read_config

    quiet = dict(log=lambda *_: None)
    out = {"fp32": root / "fp32", "static": root / "static", "last": root / "last"}
    export_checkpoint(default_checkpoint(), out["fp32"], ExportOptions(kv_cache="dynamic"), **quiet)
    export_checkpoint(default_checkpoint(), out["static"], ExportOptions(kv_cache="static"), **quiet)
    export_checkpoint(default_checkpoint(), out["last"], ExportOptions(logits="last"), **quiet)
    out["int8"] = root / "int8"
    calibrate_artifact(out["fp32"], out["int8"], CalibrationOptions(weights_only=True), **quiet)
    config = read_config(default_checkpoint())
    ckpt = save_checkpoint(random_model(NeoXConfig(**{**config.to_dict(), "num_layers": 1}), seed=7), root / "ckpt-wrong")
    shutil.copyfile(default_checkpoint() / "tokenizer.json", ckpt / "tokenizer.json")
    out["wrong"] = root / "wrong"
    export_checkpoint(ckpt, out["wrong"], ExportOptions(), **quiet)
    return out


HEAD_TEXTS = ["I loved every minute of it.", "Terrible.", "The union is strong, and the state of the economy is sound today."]
HEAD_QUESTION = "Who went to Paris?"


def export_heads(root: Path, tasks, seed: int = 3) -> dict:
    """{task: (fp32 export folder, transformers reference model)}: a TEXT_CONFIG head of each task with the
    embedded tokenizer, exported."""
    from neoxrt.export.exporter import export_checkpoint
    from neoxrt.export.options import ExportOptions

    out = {}
    for task in tasks:
        model = write_head(task, root / task, TEXT_CONFIG, seed=seed, tokenizer=True)
        export_checkpoint(root / task, root / f"{task}-art", ExportOptions(), log=lambda *_: None)
        out[task] = (root / f"{task}-art", model)
    return out


def assert_refused(command: str, cases: list[tuple[list[str], str]], tmp_path: Path, capsys) -> None:
    """Each `neoxrt COMMAND ARGS` (the word OUT in ARGS replaced by tmp_path/out) exits 2 with one stderr line
    holding its message, and leaves neither the output folder nor a temporary one behind."""
    from neoxrt.cli import main

    out = tmp_path / "out"
    for args, message in cases:
        code = main([command, *[str(out) if a == "OUT" else a for a in args]])
        err = capsys.readouterr().err.strip()
        assert code == 2, args
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
