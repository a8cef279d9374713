"""`python -m neoxrt.report.summary DIR`: one table over every DIR/*/report.json (written by `neoxrt compare
--report`), e.g. the INT8 variants of `make int8` side by side -- SmoothQuant against plain min/max, the
weight-only and quantize_dynamic baselines; the INT4 variants of `make int4`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from neoxrt.errors import NeoxrtError


def collect(folder: Path) -> dict[str, dict]:
    reports = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/report.json"))}
    if not reports:
        raise NeoxrtError(f"no */report.json under {folder} (expected neoxrt compare --report outputs)")
    return reports


def _artifact_options(report: dict) -> str:
    try:
        manifest = json.loads((Path(report["artifact"]) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "?"
    options = manifest.get("calibration", {}).get("options")
    if not options:
        return manifest.get("export_options", {}).get("dtype", "?")
    if options.get("bits") == 4:
        if options["method"] == "ort-nbits":
            head = "int4" if options["lm_head"] == "int4" else "float"
            return f"onnxruntime MatMulNBitsQuantizer, block {options['block_size']}, LM head {head}"
        return f"int4 {options['method']}, block {options['block_size']}, LM head {options['lm_head']}"
    if options["method"] == "ort-dynamic":
        return "onnxruntime quantize_dynamic"
    if options["weights_only"]:
        return "weights only"
    sq = f"SmoothQuant {options['smoothquant']}" if options["smoothquant"] else "no SmoothQuant"
    return f"{options['method']}, {sq}"


def table(reports: dict[str, dict]) -> str:
    lines = ["| variant | scheme | result | ppl ref | ppl | delta % | top-1 | top-5 | mean KL | logits max abs "
             "| greedy match |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        tf = r["teacher_forced"]
        lines.append(f"| {name} | {_artifact_options(r)} | {'PASS' if r['passed'] else 'FAIL'} | "
                     f"{tf['perplexity_reference']:.3f} | {tf['perplexity_candidate']:.3f} | "
                     f"{tf['perplexity_delta_pct']:+.3f} | {tf['top1_agreement']:.4f} | {tf['top5_overlap']:.4f} | "
                     f"{tf['kl_mean']:.2e} | {r['forward']['logits']['max_abs']:.3f} | "
                     f"{r['free_running']['greedy_match_fraction']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m neoxrt.report.summary REPORTS_DIR", file=sys.stderr)
        return 2
    try:
        reports = collect(Path(argv[0]))
    except NeoxrtError as exc:
        print(f"summary: error: {exc}", file=sys.stderr)
        return 2
    text = f"# Accuracy against PyTorch: {', '.join(reports)}\n\n" + table(reports)
    (Path(argv[0]) / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
