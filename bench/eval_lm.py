"""`make eval-lm` (not CI): lm-evaluation-harness scores a multiple-choice task twice -- `local-completions`
against `neoxrt serve --openai-port` (loglikelihoods from echo + logprobs, through the scheduler) and lm-eval's own
`hf` model on the same PyTorch checkpoint, in float64 and in float32 -- and the accuracies must equal the float64
run's. lm-eval's hf path takes the log-softmax and sums in the model's dtype: in float32 its loglikelihoods are ~3e-4
off a float64 reference, enough to flip an item whose two best choices are within 1e-5 nats; the server scores
fp32 logits with a float64 log-softmax (as `Generator.prompt_logprobs`) and is within ~1e-5 of the float64 run.

The task (`sotu_mc`, written here as a task YAML + jsonl): passages of the bundled held-out State of the Union
slice (never seen in training by the embedded pythia-14m-sotu model); each item's context is a passage's first
CONTEXT_WORDS words, its choices the true next CHOICE_WORDS words and three continuations taken from other passages.

Writes artifacts/eval-lm/ (the export, the task) and bench-results/eval-lm.{md,json}; exit 1 if the accuracies
differ from the float64 run's.
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
    from neoxrt.bench.serve import Served

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
    refs = {dtype: evaluate("hf", f"pretrained={DEFAULT_MODEL_DIR},dtype={dtype}", task_dir, device="cpu", batch_size=16)
            for dtype in ("float64", "float32")}
    result = dict(items=args.items, choices=CHOICES, server={k: v for k, v in server.items() if k != "loglikelihoods"},
                  loglikelihoods={"server": server["loglikelihoods"]})
    for dtype, ref in refs.items():
        lls = server["loglikelihoods"]
        differ = [dict(doc=d, server=lls[d], hf=ref["loglikelihoods"][d]) for d in lls
                  if np.argmax(lls[d]) != np.argmax(ref["loglikelihoods"][d])]
        result[f"hf_{dtype}"] = dict(
            {k: v for k, v in ref.items() if k != "loglikelihoods"}, differing_items=differ,
            max_abs_loglikelihood_diff=max(abs(a - b) for d in lls for a, b in zip(lls[d], ref["loglikelihoods"][d])),
            equal=server["acc"] == ref["acc"] and server["acc_norm"] == ref["acc_norm"])
        result["loglikelihoods"][f"hf_{dtype}"] = ref["loglikelihoods"]
    result["equal"] = result["hf_float64"]["equal"]
    return result


def markdown(r: dict) -> str:
    rows = [("neoxrt serve (fp32 artifact), /v1/completions, lm-eval local-completions", r["server"]),
            ("PyTorch checkpoint, lm-eval hf, dtype float64", r["hf_float64"]),
            ("PyTorch checkpoint, lm-eval hf, dtype float32", r["hf_float32"])]
    md = [f"# lm-evaluation-harness, {TASK} ({r['items']} items, {r['choices']} choices, held-out SOTU slice), "
          "pythia-14m-sotu", "", "| model | acc | acc_norm | max per-choice loglikelihood diff vs server "
          "| items picked differently |", "|---|---|---|---|---|"]
    for name, m in rows:
        diff = "" if m is r["server"] else f"{m['max_abs_loglikelihood_diff']:.2e}"
        items = "" if m is r["server"] else ", ".join(
            f"{x['doc']} (top-2 gap {_gap(x['hf']):.1e} nats)" for x in m["differing_items"]) or "none"
        md.append(f"| {name} | {m['acc']:.4f} | {m['acc_norm']:.4f} | {diff} | {items} |")
    md += ["", f"Accuracies equal to lm-eval's hf model in float64: {'yes' if r['equal'] else 'NO'}; in float32: "
           f"{'yes' if r['hf_float32']['equal'] else 'no'} (lm-eval's hf path takes log_softmax and sums in the model's "
           "dtype; the server scores fp32 logits with a float64 log-softmax, Generator.prompt_logprobs' numbers)."]
    return "\n".join(md) + "\n"


def _gap(lls: list[float]) -> float:
    top = sorted(lls)
    return top[-1] - top[-2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neoxrt.bench.eval_lm", description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=100, help="items (the held-out slice holds 111 passages)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrent", type=int, default=8, help="lm-eval's concurrent requests to the endpoint")
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--root", default="artifacts/eval-lm")
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task file is local; nothing from the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from neoxrt.bench.serve import write_results

    result = run(args)
    write_results(Path(args.out), "eval-lm", result, markdown(result))
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
