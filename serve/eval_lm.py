"""`make eval-lm` (not CI): lm-evaluation-harness scores a multiple-choice task twice -- `local-completions`
against `neoxrt serve --openai-port` (loglikelihoods from echo + logprobs, through the scheduler) and lm-eval's own
`hf` model on the same PyTorch checkpoint -- and the accuracies must be equal.

The task (`sotu_mc`, written here as a task YAML + jsonl): passages of the bundled held-out State of the Union
slice (never seen in training by the embedded pythia-14m-sotu model); each item's context is a passage's first
CONTEXT_WORDS words, its choices the true next CHOICE_WORDS words and three continuations taken from other passages.

Writes artifacts/eval-lm/ (the export, the task) and bench-results/eval-lm.{md,json}; exit 1 if the accuracies
differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

CONTEXT_WORDS, CHOICE_WORDS, CHOICES = 24, 6, 4
TASK = "sotu_mc"


def write_task(folder: Path, items: int, seed: int = 0) -> Path:
    """`folder/sotu_mc.yaml` and `folder/sotu_mc.jsonl` from the held-out corpus; returns the folder."""
    from neoxrt.assets import EVAL_TEXT

    words = EVAL_TEXT.read_text(encoding="utf-8").split()
    span = CONTEXT_WORDS + CHOICE_WORDS
    starts = list(range(0, len(words) - span, span))[:items]
    if len(starts) < items:
        raise SystemExit(f"the corpus slice holds {len(starts)} passages of {span} words, asked for {items}")
    rng = np.random.default_rng(seed)
    conts = [" ".join(words[s + CONTEXT_WORDS:s + span]) for s in starts]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{TASK}.jsonl").open("w", encoding="utf-8") as f:
        for i, s in enumerate(starts):
            others = rng.choice([j for j in range(len(starts)) if conts[j] != conts[i]], CHOICES - 1, replace=False)
            choices = [conts[i]] + [conts[j] for j in others]
            order = rng.permutation(CHOICES)
            f.write(json.dumps({"context": " ".join(words[s:s + CONTEXT_WORDS]),
                                "choices": [choices[k] for k in order], "label": int(np.argmax(order == 0))}) + "\n")
    (folder / f"{TASK}.yaml").write_text("\n".join([
        f"task: {TASK}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {(folder / f'{TASK}.jsonl').resolve()}", "test_split: test", "output_type: multiple_choice",
        "doc_to_text: context", "doc_to_choice: choices", "doc_to_target: label", "metric_list:",
        "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
        "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true", ""]))
    return folder


def evaluate(model: str, model_args: str, task_dir: Path, **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                          task_manager=TaskManager(include_path=str(task_dir)), **kwargs)
    metrics = out["results"][TASK]
    lls = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"][TASK]}
    return dict(acc=metrics["acc,none"], acc_norm=metrics["acc_norm,none"],
                acc_stderr=metrics.get("acc_stderr,none"), loglikelihoods=lls)


def run(args) -> dict:
    from neoxrt.assets import DEFAULT_MODEL_DIR
    from neoxrt.bench.run import neoxrt_artifact
    from neoxrt.serve.bench import Served

    root = Path(args.root)
    task_dir = write_task(root / "task", args.items)
    artifact = neoxrt_artifact("pythia-14m-sotu", DEFAULT_MODEL_DIR, "fused", root)  # every position's logits: echo
    served = Served(artifact, args.threads, 16, args.port, openai=True)
    try:
        server = evaluate("local-completions", f"model=neoxrt,base_url={served.openai}/completions,"
                          f"tokenizer={DEFAULT_MODEL_DIR},tokenizer_backend=huggingface,num_concurrent={args.concurrent},"
                          "max_retries=1,tokenized_requests=True", task_dir)
    finally:
        served.stop()
    torch_hf = evaluate("hf", f"pretrained={DEFAULT_MODEL_DIR},dtype=float32", task_dir, device="cpu", batch_size=16)
    diffs = [abs(a - b) for d, lls in server["loglikelihoods"].items()
             for a, b in zip(lls, torch_hf["loglikelihoods"][d])]
    same_pick = sum(int(np.argmax(lls) == np.argmax(torch_hf["loglikelihoods"][d]))
                    for d, lls in server["loglikelihoods"].items())
    return dict(items=args.items, choices=CHOICES, server={k: v for k, v in server.items() if k != "loglikelihoods"},
                hf={k: v for k, v in torch_hf.items() if k != "loglikelihoods"}, max_abs_loglikelihood_diff=max(diffs),
                same_prediction=same_pick, equal=server["acc"] == torch_hf["acc"] and server["acc_norm"] == torch_hf["acc_norm"])


def markdown(r: dict) -> str:
    rows = [("neoxrt serve, /v1/completions (lm-eval local-completions)", r["server"]),
            ("PyTorch checkpoint (lm-eval hf)", r["hf"])]
    md = [f"# lm-evaluation-harness, {TASK} ({r['items']} items, {r['choices']} choices, held-out SOTU slice), "
          "pythia-14m-sotu fp32", "", "| model | acc | acc_norm |", "|---|---|---|"]
    md += [f"| {name} | {m['acc']:.4f} | {m['acc_norm']:.4f} |" for name, m in rows]
    md += ["", f"Per choice loglikelihood, max |server - hf|: {r['max_abs_loglikelihood_diff']:.2e}; same prediction on "
           f"{r['same_prediction']}/{r['items']} items; accuracies equal: {'yes' if r['equal'] else 'NO'}"]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neoxrt.serve.eval_lm", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=100, help="items (the held-out slice holds 111 passages)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrent", type=int, default=8, help="lm-eval's concurrent requests to the endpoint")
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--root", default="artifacts/eval-lm")
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task file is local; nothing from the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from neoxrt.serve.bench import write_results

    result = run(args)
    write_results(Path(args.out), "eval-lm", result, markdown(result))
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
