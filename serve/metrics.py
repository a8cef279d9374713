"""The scheduler's counters as Prometheus text (`GET /metrics` on the OpenAI endpoint), under vLLM's names where
vLLM has the metric (so its dashboards and autoscaling rules read ours), `neoxrt_*` for the rest.

    vllm:num_requests_running / vllm:num_requests_waiting     gauges: rows decoding or prefilling / queued
    vllm:kv_cache_usage_perc                                  gauge: the pool's slots in use / its capacity (0 to 1)
    vllm:prefix_cache_queries_total / vllm:prefix_cache_hits_total   counters: prompt tokens looked up / found
    vllm:num_preemptions_total                                counter: always 0 (the pool reserves at admission)
    vllm:prompt_tokens_total / vllm:generation_tokens_total   counters
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds  histograms
    neoxrt_requests_total, neoxrt_rejected_total, neoxrt_cancelled_total, neoxrt_failed_total,
    neoxrt_prefill_tokens_total, neoxrt_steps_total, neoxrt_row_steps_total    counters
"""

from __future__ import annotations

from neoxrt.runtime.scheduler_stats import Histogram, SchedulerStats


def prometheus_text(s: SchedulerStats, model: str) -> str:
    """The exposition format (text/plain; version=0.0.4), every sample labelled `model_name`."""
    label = f'model_name="{model}"'
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, value: float) -> None:
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value:g}"])

    def histogram(name: str, text: str, h: Histogram) -> None:
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} histogram"])
        for bound, count in zip(h.bounds, h.counts):
            lines.append(f'{name}_bucket{{{label},le="{bound:g}"}} {count}')
        lines.extend([f'{name}_bucket{{{label},le="+Inf"}} {h.count}', f"{name}_sum{{{label}}} {h.sum:g}",
                      f"{name}_count{{{label}}} {h.count}"])

    metric("vllm:num_requests_running", "gauge", "Requests in the running batch (decoding or prefilling).", s.active)
    metric("vllm:num_requests_waiting", "gauge", "Requests waiting for room.", s.queued)
    usage = s.pool_tokens / s.pool_capacity if s.pool_capacity else 0.0
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache pool slots in use, 0 to 1 (0 without the pool).", usage)
    metric("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           s.prefix_queries)
    metric("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", s.prefix_hits)
    metric("vllm:num_preemptions_total", "counter", "Preemptions (none: the pool reserves at admission).", 0)
    metric("vllm:prompt_tokens_total", "counter", "Prompt tokens of the requests accepted.", s.prompt_tokens)
    metric("vllm:generation_tokens_total", "counter", "Tokens generated.", s.tokens)
    histogram("vllm:time_to_first_token_seconds", "Time from submission to the first token.", s.ttft)
    histogram("vllm:inter_token_latency_seconds", "Time between a request's tokens.", s.itl)
    histogram("vllm:e2e_request_latency_seconds", "Time from submission to the last token.", s.e2e)
    for key, text in (("requests", "Requests accepted."), ("rejected", "Requests refused: the queue was full."),
                      ("cancelled", "Requests cancelled by their client."),
                      ("failed", "Requests ended by an error of their own."),
                      ("prefill_tokens", "Prompt tokens computed (not found in the prefix cache)."),
                      ("shared_prefix_rows", "Rows that attended the KV-cache pool's shared prefix instead of "
                                             "holding a copy."),
                      ("steps", "Decode steps."), ("row_steps", "Rows decoded, summed over decode steps.")):
        metric(f"neoxrt_{key}_total", "counter", text, getattr(s, key))
    return "\n".join(lines) + "\n"
