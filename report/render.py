"""report.md (read in ten seconds), report.json (stable keys) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def markdown(report: dict) -> str:
    if "task" in report:  # a head artifact (report.compare_heads)
        from neoxrt.report.compare_heads import markdown_heads

        return markdown_heads(report)
    status = "PASS" if report["passed"] else "FAIL"
    tf, free = report["teacher_forced"], report["free_running"]
    lines = [
        f"# neoxrt compare: {status}",
        "",
        f"- artifact: `{report['artifact']}` ({report.get('artifact_kind', 'neoxrt artifact')}, {report['precision']}"
        + (f"; {report['thresholds']} thresholds" if report.get("thresholds", report["precision"]) != report["precision"]
           else "") + ")",
        f"- reference: `{report['reference']}` "
        f"({'PyTorch, fp32' if report.get('reference_kind', 'PyTorch') == 'PyTorch' else 'artifact'})",
        *[f"- **modified since export:** `{m['file']}` sha256 {m['found_sha256'][:16]}… (manifest {m['manifest_sha256'][:16]}…)"
          for m in report.get("modified_files", [])],
        "",
        "| check | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for c in report["checks"]:
        op = "<=" if c["kind"] == "max" else ">="
        lines.append(f"| {c['name']} | {_fmt(c['value'])} | {op} {_fmt(c['threshold'])} | {'PASS' if c['passed'] else 'FAIL'} |")
    lg, pr = report["forward"]["logits"], report["forward"]["presents"]
    lines += [
        "",
        f"Perplexity over {tf['tokens']} tokens ({tf['windows']} windows): reference {_fmt(tf['perplexity_reference'])}, "
        f"candidate {_fmt(tf['perplexity_candidate'])} ({tf['perplexity_delta_pct']:+.4f} %); "
        f"top-5 overlap {_fmt(tf['top5_overlap'])}; mean KL {_fmt(tf['kl_mean'])}.",
        "",
        f"Forward pass: logits max abs {_fmt(lg['max_abs'])} (max rel {_fmt(lg['max_rel'])}, mean abs "
        f"{_fmt(lg['mean_abs'])}) at {lg['worst_index']}; worst present `{pr['name']}` max abs {_fmt(pr['max_abs'])} "
        f"at {pr['worst_index']}.",
        "",
        "| prompt | greedy tokens matching | first divergence |",
        "|---|---|---|",
    ]
    for p in free["prompts"]:
        first = "-" if p["first_divergence"] is None else str(p["first_divergence"])
        lines.append(f"| {p['prompt'][:48]} | {p['match_length']}/{p['tokens']} | {first} |")
    if report["localisation"]:
        lines += ["", f"**Localisation:** {report['localisation']['message']} (by {report['localisation']['method']})."]
    if report["per_layer"].get("available"):
        lines += ["", "Per-layer hidden-state error (max abs / relative): " + ", ".join(
            f"layer {e['layer']} {_fmt(e['max_abs'])}/{_fmt(e['rel'])}" for e in report["per_layer"]["layers"]) + "."]
    return "\n".join(lines) + "\n"


def plots(report: dict, folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if "teacher_forced" in report:  # head reports (report.compare_heads) have the per-layer plot only
        per_pos = report["teacher_forced"]["per_position"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(per_pos["kl"], label="KL(reference || candidate)")
        ax.set_xlabel("position in window")
        ax.set_ylabel("mean KL")
        ax2 = ax.twinx()
        ax2.plot(per_pos["top1_agreement"], color="tab:orange", label="top-1 agreement")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("top-1 agreement (orange)")
        ax.set_title("Error per position (teacher-forced)")
        fig.tight_layout()
        fig.savefig(folder / "error_per_position.png", dpi=100)
        plt.close(fig)
        written.append("error_per_position.png")
    if report["per_layer"].get("available"):
        layers = report["per_layer"]["layers"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.semilogy([e["layer"] for e in layers], [max(e["max_abs"], 1e-12) for e in layers], marker="o")
        ax.set_xlabel("layer")
        ax.set_ylabel("hidden state max abs error")
        ax.set_title("Error per layer")
        fig.tight_layout()
        fig.savefig(folder / "error_per_layer.png", dpi=100)
        plt.close(fig)
        written.append("error_per_layer.png")
    return written


def write_report(report: dict, folder: Path) -> list[str]:
    """Write report.md, report.json and plots into `folder` (created); returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (folder / "report.md").write_text(markdown(report))
    return ["report.md", "report.json", *plots(report, folder)]
