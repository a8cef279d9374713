"""`neoxrt compare`: a graph against a reference on the same inputs -- forward pass, teacher-forced text,
free-running greedy -- with per-layer localisation of where the error starts. The graph: our artifact, Optimum's
export folder or a bare .onnx with optimum's names; the reference: the PyTorch checkpoint, or another artifact
(`--against`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import ArtifactError, NeoxrtError
from neoxrt.manifest import ORT_SESSION_CONFIG
from neoxrt.progress import Progress
from neoxrt.report.metrics import TeacherForced, first_divergence, tensor_diff
from neoxrt.report.sources import Candidate, first_layer_with_other_weights, hidden_state_names, open_candidate
from neoxrt.report.thresholds import thresholds_for
from neoxrt.runtime.generator import left_pad

DEFAULT_PROMPTS = ["The state of the Union is", "Gentlemen of the Senate and House of Representatives:",
                   "The Secretary of the Treasury reports that the revenue"]
JUMP_FLOOR = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.1, "int4": 0.2}


@dataclass
class CompareOptions:
    texts: list[Path] = field(default_factory=list)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 32
    seq_len: int = 128
    windows: int = 16
    batch: int = 2
    thresholds: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        for name, low in (("max_new_tokens", 1), ("seq_len", 2), ("windows", 1), ("batch", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                # a window of one token predicts nothing: perplexity over zero tokens (was a ZeroDivisionError)
                raise NeoxrtError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")


def _windows(tokenizer, texts: list[Path], seq_len: int, count: int) -> np.ndarray:
    ids: list[int] = []
    for path in texts:
        if not Path(path).is_file():
            raise NeoxrtError(f"--text {path}: file not found")
        ids += tokenizer.encode(Path(path).read_text(encoding="utf-8")).ids
    n = min(count, len(ids) // seq_len)
    if n < 1:
        raise NeoxrtError(f"text has {len(ids)} tokens; need at least one window of {seq_len}")
    return np.array(ids[: n * seq_len], np.int64).reshape(n, seq_len)


class TorchReference:
    """The PyTorch model of a checkpoint: logits, presents and (with hooks) each layer's output."""

    name = "PyTorch"

    def __init__(self, checkpoint):
        import torch

        from neoxrt.model import load_model, resolve_checkpoint

        self.torch = torch
        self.folder = resolve_checkpoint(checkpoint)
        self.model = load_model(self.folder)
        self.config = self.model.config.to_dict()

    def forward(self, ids, mask, pos, hooks: bool = False):
        torch, model = self.torch, self.model
        captured = []

        def keep(_module, _inputs, out):
            captured.append(out[0].numpy())

        handles = [layer.register_forward_hook(keep) for layer in model.layers] if hooks else []
        try:
            with torch.no_grad():
                logits, presents = model(torch.tensor(ids), torch.tensor(pos), torch.tensor(mask),
                                         model.empty_past(len(ids)))
        finally:
            for h in handles:
                h.remove()
        return logits.numpy(), [(k.numpy(), v.numpy()) for k, v in presents], captured

    def greedy(self, rows, n):
        from neoxrt.model.generate import greedy

        return greedy(self.model, rows, n)

    def layer_weights(self):
        """Per layer, its 2-D weights; the qkv projection also in the fused export's packed [q | k | v] order
        (a list of alternatives: either form found counts)."""
        from neoxrt.export.neox_onnx import packed_order

        cfg = self.model.config
        state = {k: v.numpy() for k, v in self.model.state_dict().items()}
        order = packed_order(cfg.num_heads, cfg.head_dim)
        return [[[state[k], state[k][order]] if k.endswith(".qkv.weight") else [state[k]]
                 for k in sorted(state) if k.startswith(f"layers.{i}.") and state[k].ndim == 2]
                for i in range(cfg.num_layers)]


class ArtifactReference:
    """Another artifact as the reference (`--against`): its logits, presents and named hidden states."""

    name = "artifact"

    def __init__(self, path, allow_modified: bool):
        from neoxrt.manifest import read_manifest

        self.folder = Path(path)
        manifest = read_manifest(self.folder, ("export", "calibrate", "build"), verify_files=not allow_modified)
        self.config = manifest["config"]
        self.candidate = open_candidate(self.folder, self.config, None, allow_modified)
        self.shape = (self.config["num_layers"], self.config["num_heads"],
                      self.config["hidden_size"] // self.config["num_heads"])
        self.kv_dtype = next(t["dtype"] for t in manifest["io"]["inputs"] if t["name"] == io.past_key(0))
        self.static = any(t["name"] == io.WRITE_INDICES for t in manifest["io"]["inputs"])
        logits = next(t for t in manifest["io"]["outputs"] if t["name"] == io.LOGITS)
        if not isinstance(logits["shape"][1], str):
            raise ArtifactError(f"--against {path}: a reference must return every position's logits "
                                "(export it with --logits all)")

    def forward(self, ids, mask, pos, hooks: bool = False):
        feeds = io.prompt_feeds(ids, mask, pos, *self.shape, self.kv_dtype, self.static)
        if hooks:
            out, hidden = run_with_hidden(self.candidate, feeds, self.shape[0])
        else:
            out, hidden = self.candidate.generator.session.run(feeds), []
        presents = [(np.asarray(out[io.present_key(i)], np.float32), np.asarray(out[io.present_value(i)], np.float32))
                    for i in range(self.shape[0])]
        return np.asarray(out[io.LOGITS], np.float32), presents, hidden

    def greedy(self, rows, n):
        return self.candidate.generator.generate(rows, max_new_tokens=n, ignore_eos=True).ids


def run_with_hidden(candidate: Candidate, feeds: dict, layers: int) -> tuple[dict, list]:
    """One run of the candidate's graph with each layer's output added as a graph output (the graph is
    re-saved in a temporary folder; the artifact is never written to). Returns (outputs, hidden or [])."""
    import onnx

    from neoxrt.runtime.ort_session import OrtSession

    model = onnx.load(str(candidate.model_path))
    names, method = hidden_state_names(model, layers)
    if not names:
        return candidate.generator.session.run(feeds), []
    existing = {o.name for o in model.graph.output}
    for name in names.values():
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    big = sum(len(t.raw_data) for t in model.graph.initializer) > 2**31 - 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / io.MODEL_FILE
        onnx.save_model(model, str(path), save_as_external_data=big, location=io.WEIGHTS_FILE)
        session = OrtSession(path, config=candidate.manifest.get(ORT_SESSION_CONFIG))
    out = session.run(feeds)
    return out, [np.asarray(out[names[i]], np.float32) for i in range(layers)]


class Comparison:
    """Holds the reference (PyTorch, or another artifact), the candidate session and the artifact's facts."""

    def __init__(self, artifact: Path, reference, options: CompareOptions, against=None, allow_modified: bool = False):
        self.artifact = Path(artifact)
        self.options = options
        self.ref = ArtifactReference(against, allow_modified) if against is not None else TorchReference(reference)
        self.candidate = open_candidate(self.artifact, self.ref.config, self.ref.folder, allow_modified)
        self.generator = self.candidate.generator
        self.manifest = self.candidate.manifest
        self.precision = self.candidate.precision
        if self.candidate.kind == "neoxrt artifact" and self.ref.config != self.manifest["config"]:
            raise ArtifactError(f"reference {against or reference} is not the model the artifact was exported from "
                                "(configs differ)")
        cfg = self.ref.config
        self.kv_dtype = next(t["dtype"] for t in self.manifest["io"]["inputs"] if t["name"] == io.past_key(0))
        self.static = any(t["name"] == io.WRITE_INDICES for t in self.manifest["io"]["inputs"])
        self.shape = (cfg["num_layers"], cfg["num_heads"], cfg["hidden_size"] // cfg["num_heads"])

    def _reference_forward(self, ids, mask, pos, hooks: bool = False):
        return self.ref.forward(ids, mask, pos, hooks)

    def forward(self) -> dict:
        rows = self.generator.encode(self.options.prompts)
        ids, mask, pos = left_pad(rows)
        out = self.generator.session.run(io.prompt_feeds(ids, mask, pos, *self.shape, self.kv_dtype, self.static))
        ref_logits, ref_presents, _ = self._reference_forward(ids, mask, pos)
        valid = mask.astype(bool)
        rows = out[io.LOGITS].shape[1]  # S, or 1 for a last-position-only graph
        logits = tensor_diff(io.LOGITS, out[io.LOGITS], ref_logits[:, -rows:], valid[:, -rows:, None])
        top = np.abs(out[io.LOGITS].max(-1) - np.asarray(ref_logits[:, -rows:]).max(-1))[valid[:, -rows:]]
        key_valid = valid[:, None, :, None]  # [B,1,T,1]
        worst = None
        for i, (k, v) in enumerate(ref_presents):
            for name, ref in ((io.present_key(i), k), (io.present_value(i), v)):
                d = tensor_diff(name, out[name], ref, key_valid)
                worst = d if worst is None or d.max_abs > worst.max_abs else worst
        return {"logits": logits.to_dict(), "presents": worst.to_dict(), "top_logit_max_abs": float(top.max())}

    def teacher_forced(self) -> dict:
        if self.generator.tokenizer is None:
            raise ArtifactError(f"artifact {self.artifact} has no tokenizer.json; teacher-forced text needs one")
        from neoxrt.assets import EVAL_TEXT

        windows = _windows(self.generator.tokenizer, self.options.texts or [EVAL_TEXT], self.options.seq_len,
                           self.options.windows)
        stats = TeacherForced()
        b = self.options.batch
        bar = Progress(len(windows), "teacher-forced", self.options.progress)
        for start in range(0, len(windows), b):
            ids = windows[start: start + b]
            mask = np.ones_like(ids)
            pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64).copy()
            cand = self._all_position_logits(ids, mask, pos)
            ref, _, _ = self._reference_forward(ids, mask, pos)
            stats.add(ref, cand, ids)
            bar.update(min(start + b, len(windows)))
        return stats.summary()

    def _all_position_logits(self, ids, mask, pos) -> np.ndarray:
        """[B, S, V] from one prompt step, or -- for a graph that returns the last position only -- from a
        one-token prompt and S-1 decode steps through the artifact's own decoder."""
        session = self.generator.session
        spec = next(o for o in session.io_spec()[1] if o.name == io.LOGITS)
        if io.logits_rows(spec, ids.shape[1]) == ids.shape[1]:
            return session.run(io.prompt_feeds(ids, mask, pos, *self.shape, self.kv_dtype, self.static))[io.LOGITS]
        decoder = session.decoder(len(ids), ids.shape[1])
        steps = [decoder.step(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1]).copy() for t in range(ids.shape[1])]
        return np.stack(steps, axis=1)

    def free_running(self) -> dict:
        rows = self.generator.encode(self.options.prompts)
        n = self.options.max_new_tokens
        cand = self.generator.generate(rows, max_new_tokens=n, stop_token_ids=()).ids
        ref = self.ref.greedy(rows, n)
        per_prompt = []
        for prompt, c, r in zip(self.options.prompts, cand, ref):
            r = r[: len(c)] if len(c) < n else r  # a candidate that stopped on EOS is compared as far as it went
            per_prompt.append({"prompt": prompt, "match_length": first_divergence(c, r), "tokens": len(c),
                               "first_divergence": None if c == r else first_divergence(c, r)})
        fraction = sum(p["match_length"] for p in per_prompt) / max(sum(p["tokens"] for p in per_prompt), 1)
        return {"greedy_match_fraction": fraction, "prompts": per_prompt}

    def per_layer(self) -> dict:
        """Each layer's output, candidate (extra graph outputs, found by exporter naming) against the reference;
        where no naming matches, the first layer whose weights differ from the reference's."""
        rows = self.generator.encode(self.options.prompts)
        ids, mask, pos = left_pad(rows)
        feeds = io.prompt_feeds(ids, mask, pos, *self.shape, self.kv_dtype, self.static)
        import onnx

        names, method = hidden_state_names(onnx.load(str(self.candidate.model_path), load_external_data=False),
                                           self.shape[0])
        if not names:
            if isinstance(self.ref, TorchReference):
                layer = first_layer_with_other_weights(self.candidate.model_path, self.ref)
                return {"available": False, "method": "weights compared with the checkpoint's",
                        "first_layer_with_other_weights": layer}
            return {"available": False, "method": None}
        out, hidden = run_with_hidden(self.candidate, feeds, self.shape[0])
        _, _, ref_hidden = self._reference_forward(ids, mask, pos, hooks=True)
        if not ref_hidden:
            return {"available": False, "method": method, "reason": "the reference graph has no per-layer outputs"}
        valid = mask.astype(bool)[:, :, None]
        errors = []
        for i in range(self.shape[0]):
            d = tensor_diff(f"layer {i}", hidden[i], ref_hidden[i], valid)
            scale = float(np.abs(ref_hidden[i]).max())
            errors.append({"layer": i, "max_abs": d.max_abs, "rel": d.max_abs / max(scale, 1e-12)})
        return {"available": True, "method": method, "layers": errors,
                "first_jump_layer": first_jump_layer(errors, self.precision)}


def first_jump_layer(errors: list[dict], precision: str) -> int | None:
    """The first layer whose relative error passes the precision's floor and 10x the layer before; None if none."""
    floor, previous = JUMP_FLOOR[precision], 0.0
    for e in errors:
        if e["rel"] > max(floor, 10 * previous):
            return e["layer"]
        previous = e["rel"]
    return None


def run_compare(artifact, reference, options: CompareOptions, against=None, allow_modified: bool = False) -> dict:
    """All checks; returns the report dict (see render.write_report for the files). Head artifacts (`neoxrt export
    --task ...`) are compared by `report.compare_heads`.

    Args:
        artifact: our artifact folder, a folder with model.onnx (Optimum's export), or a .onnx file.
        reference: the checkpoint (PyTorch reference); ignored when `against` names another artifact.
        allow_modified: compare our artifact even if files differ from its manifest (listed in the report).
    """
    from neoxrt.manifest import MANIFEST_FILE, read_manifest

    path = Path(artifact)
    if (path / MANIFEST_FILE).is_file() and read_manifest(path, ("export", "calibrate", "build"), verify_files=False).get(
            "task", io.TEXT_GENERATION) != io.TEXT_GENERATION:
        from neoxrt.report.compare_heads import run_compare_heads

        return run_compare_heads(artifact, reference, options)
    cmp = Comparison(artifact, reference, options, against, allow_modified)
    screened = cmp.manifest.get("export_options", {}).get("lm_head") == "screened" and cmp.precision == "fp32"
    thresholds = "fp32-screened" if screened else cmp.precision
    table = thresholds_for(thresholds, options.thresholds)
    forward = cmp.forward()
    teacher = cmp.teacher_forced()
    free = cmp.free_running()
    values = {
        "logits_max_abs": forward["logits"]["max_abs"],
        "top_logit_max_abs": forward["top_logit_max_abs"],
        "presents_max_abs": forward["presents"]["max_abs"],
        "top1_agreement": teacher["top1_agreement"],
        "perplexity_delta_pct": abs(teacher["perplexity_delta_pct"]),
        "greedy_match_fraction": free["greedy_match_fraction"],
    }
    checks = []
    for name, (kind, threshold) in table.items():
        value = values[name]
        passed = bool(np.isfinite(value) and (value <= threshold if kind == "max" else value >= threshold))
        checks.append({"name": name, "value": value, "kind": kind, "threshold": threshold, "passed": passed})
    per_layer = cmp.per_layer()
    passed = all(c["passed"] for c in checks)
    localisation = None
    if not passed and per_layer.get("available"):
        jump = per_layer["first_jump_layer"]
        localisation = {"first_layer": jump, "method": per_layer["method"],
                        "message": f"error first jumps at layer {jump}" if jump is not None
                        else "no single layer stands out; the error grows gradually"}
    elif not passed and per_layer.get("method"):
        layer = per_layer.get("first_layer_with_other_weights")
        localisation = {"first_layer": layer, "method": per_layer["method"],
                        "message": f"layer {layer} is the first whose weights differ from the checkpoint's"
                        if layer is not None else "every layer's weights are the checkpoint's"}
    return {
        "artifact": str(Path(artifact).resolve()),
        "artifact_kind": cmp.candidate.kind,
        "reference": str(against) if against is not None else str(reference),
        "reference_kind": cmp.ref.name,
        "modified_files": cmp.candidate.modified,
        "precision": cmp.precision,
        "thresholds": thresholds,
        "passed": passed,
        "checks": checks,
        "forward": forward,
        "teacher_forced": teacher,
        "free_running": free,
        "per_layer": per_layer,
        "localisation": localisation,
    }
