"""`neoxrt compare` for head artifacts (`neoxrt export --task ...`): the artifact on right-padded batches
against the PyTorch head (`neoxrt.model.heads.NeoXHead`) on each row alone -- output error over real tokens,
label agreement (argmax of each decision: per text, per token, or the answer's start and end), and the
hidden state after each layer to localise where an error starts.

Rows are held-out text windows (the embedded eval slice or --text files) cut to different lengths, so every
batch is padded and the comparison also proves padding invariance.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from neoxrt import contract as io
from neoxrt.errors import ArtifactError
from neoxrt.export.neox_onnx import hidden_state_name
from neoxrt.manifest import ORT_SESSION_CONFIG, precision_of, read_manifest
from neoxrt.report.compare import CompareOptions, _windows, first_jump_layer
from neoxrt.report.metrics import tensor_diff
from neoxrt.report.thresholds import HEAD_DEFAULTS, thresholds_for
from neoxrt.runtime.classifier import right_pad


def _rows(tokenizer, options: CompareOptions, max_positions: int) -> list[list[int]]:
    """Eval windows cut to lengths from seq_len down to about half of it (every batch padded)."""
    from neoxrt.assets import EVAL_TEXT

    seq_len = min(options.seq_len, max_positions)
    windows = _windows(tokenizer, options.texts or [EVAL_TEXT], seq_len, options.windows)
    return [w[: max(1, seq_len - (i * 37) % max(1, seq_len // 2))].tolist() for i, w in enumerate(windows)]


def _decisions(task: str, out: dict) -> list[np.ndarray]:
    """The argmax decisions of one row's outputs (none for feature extraction)."""
    if task == io.QUESTION_ANSWERING:
        return [np.atleast_1d(np.argmax(out[io.START_LOGITS])), np.atleast_1d(np.argmax(out[io.END_LOGITS]))]
    if task in (io.TEXT_CLASSIFICATION, io.TOKEN_CLASSIFICATION):
        return [np.atleast_1d(np.argmax(out[io.LOGITS], axis=-1))]
    return []


class _HeadComparison:
    def __init__(self, artifact: Path, reference, options: CompareOptions):
        import torch

        from neoxrt.model.heads import load_head_model

        self.torch, self.artifact, self.options = torch, Path(artifact), options
        self.manifest = read_manifest(self.artifact, ("export", "calibrate", "build"))
        if self.manifest["stage"] == "build":
            raise ArtifactError(f"artifact {artifact}: TensorRT engines of head graphs are not supported")
        self.task, self.precision = self.manifest["task"], precision_of(self.manifest)
        self.reference = load_head_model(reference, self.task)
        if self.reference.config.to_dict() != self.manifest["config"]:
            raise ArtifactError(f"reference {reference} is not the model the artifact was exported from (configs differ)")
        if not (self.artifact / io.TOKENIZER_FILE).is_file():
            raise ArtifactError(f"artifact {artifact} has no {io.TOKENIZER_FILE}; the comparison reads text")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.artifact / io.TOKENIZER_FILE))

    def _session(self, with_layers: bool):
        """The artifact's graph on ONNX Runtime; with_layers adds each layer's hidden state as an output (a
        temporary copy: the artifact folder is never written to)."""
        import onnx

        from neoxrt.runtime.ort_session import OrtSession

        config = self.manifest.get(ORT_SESSION_CONFIG)
        if not with_layers:
            return OrtSession(self.artifact / io.MODEL_FILE, config=config), None
        model = onnx.load(str(self.artifact / io.MODEL_FILE))
        names = [hidden_state_name(i) for i in range(self.reference.config.num_layers)]
        produced = {o for n in model.graph.node for o in n.output}
        if not all(n in produced for n in names):
            return OrtSession(self.artifact / io.MODEL_FILE, config=config), None
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
        big = sum(len(t.raw_data) for t in model.graph.initializer) > 2**31 - 1
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / io.MODEL_FILE
            onnx.save_model(model, str(path), save_as_external_data=big, location=io.WEIGHTS_FILE)
            return OrtSession(path, config=config), names

    def _reference(self, row: list[int]) -> tuple[dict, list[np.ndarray]]:
        torch, model = self.torch, self.reference
        captured = []
        handles = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0][0].numpy()))
                   for layer in model.layers]
        try:
            with torch.no_grad():
                ids = torch.tensor([row])
                out = {k: v[0].numpy() for k, v in model(ids, torch.ones_like(ids)).items()}
        finally:
            for h in handles:
                h.remove()
        return out, captured

    def run(self) -> dict:
        rows = _rows(self.tokenizer, self.options, int(self.manifest["config"]["max_position_embeddings"]))
        session, layer_names = self._session(with_layers=True)
        pad = self.manifest["config"].get("eos_token_id") or 0
        cand, ref, layer_err = {}, {}, {}
        agree = total = 0
        for begin in range(0, len(rows), self.options.batch):
            chunk = rows[begin:begin + self.options.batch]
            ids, mask = right_pad(chunk, pad)
            out = session.run({io.INPUT_IDS: ids, io.ATTENTION_MASK: mask})
            for b, row in enumerate(chunk):
                n = len(row)
                mine = {k: out[k][b] if self.task == io.TEXT_CLASSIFICATION else out[k][b, :n]
                        for k in out if not k.startswith("hidden_states.")}
                theirs, hidden = self._reference(row)
                for k in mine:
                    cand.setdefault(k, []).append(np.asarray(mine[k], np.float64).ravel())
                    ref.setdefault(k, []).append(np.asarray(theirs[k], np.float64).ravel())
                for c, r in zip(_decisions(self.task, mine), _decisions(self.task, theirs)):
                    agree, total = agree + int((c == r).sum()), total + c.size
                for i, name in enumerate(layer_names or []):
                    e = layer_err.setdefault(i, [0.0, 0.0])
                    if out[name].ndim == 2:  # a sequence classifier's last layer: the pooled (last real) token
                        mine_i, ref_i = out[name][b], hidden[i][n - 1]
                    else:
                        mine_i, ref_i = out[name][b, :n], hidden[i]
                    e[0] = max(e[0], float(np.abs(mine_i - ref_i).max()))
                    e[1] = max(e[1], float(np.abs(ref_i).max()))
        outputs = {k: tensor_diff(k, np.concatenate(cand[k]), np.concatenate(ref[k])).to_dict() for k in cand}
        layers = [{"layer": i, "max_abs": e[0], "rel": e[0] / max(e[1], 1e-12)} for i, e in sorted(layer_err.items())]
        per_layer = {"available": bool(layers), "layers": layers,
                     "first_jump_layer": first_jump_layer(layers, self.precision) if layers else None}
        return {"rows": len(rows), "tokens": sum(len(r) for r in rows), "outputs": outputs,
                "label_agreement": agree / total if total else None, "decisions": total, "per_layer": per_layer}


def run_compare_heads(artifact, reference, options: CompareOptions) -> dict:
    """All checks of a head artifact; the report dict (`render.write_report` writes it)."""
    cmp = _HeadComparison(artifact, reference, options)
    result = cmp.run()
    values = {"output_max_abs": max(o["max_abs"] for o in result["outputs"].values()),
              "label_agreement": result["label_agreement"]}
    checks = []
    for name, (kind, threshold) in thresholds_for(cmp.precision, options.thresholds, HEAD_DEFAULTS).items():
        value = values[name]
        if value is None:  # feature extraction has no labels
            continue
        passed = bool(np.isfinite(value) and (value <= threshold if kind == "max" else value >= threshold))
        checks.append({"name": name, "value": value, "kind": kind, "threshold": threshold, "passed": passed})
    passed = all(c["passed"] for c in checks)
    localisation = None
    if not passed and result["per_layer"]["available"]:
        jump = result["per_layer"]["first_jump_layer"]
        localisation = {"first_layer": jump, "message": f"error first jumps at layer {jump}" if jump is not None
                        else "no single layer stands out; the error grows gradually"}
    return {"artifact": str(Path(artifact).resolve()), "reference": str(reference), "task": cmp.task,
            "precision": cmp.precision, "passed": passed, "checks": checks, **result, "localisation": localisation}


def markdown_heads(report: dict) -> str:
    """report.md of a head comparison."""
    lines = [f"# neoxrt compare ({report['task']}): {'PASS' if report['passed'] else 'FAIL'}", "",
             f"- artifact: `{report['artifact']}` ({report['precision']})",
             f"- reference: `{report['reference']}` (PyTorch, fp32, each row alone)",
             f"- {report['rows']} rows, {report['tokens']} tokens, right-padded batches", "",
             "| check | value | threshold | result |", "|---|---|---|---|"]
    for c in report["checks"]:
        op = "<=" if c["kind"] == "max" else ">="
        lines.append(f"| {c['name']} | {c['value']:.4g} | {op} {c['threshold']:.4g} | {'PASS' if c['passed'] else 'FAIL'} |")
    lines += ["", "| output | max abs | max rel | mean abs |", "|---|---|---|---|"]
    for name, d in report["outputs"].items():
        lines.append(f"| {name} | {d['max_abs']:.4g} | {d['max_rel']:.4g} | {d['mean_abs']:.4g} |")
    if report["localisation"]:
        lines += ["", f"**Localisation:** {report['localisation']['message']}."]
    if report["per_layer"]["available"]:
        lines += ["", "Per-layer hidden-state error (max abs / relative): " + ", ".join(
            f"layer {e['layer']} {e['max_abs']:.4g}/{e['rel']:.4g}" for e in report["per_layer"]["layers"]) + "."]
    return "\n".join(lines) + "\n"
