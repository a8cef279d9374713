"""The scheduler's counters since start, and the latency histograms behind /metrics (vLLM's buckets)."""

from __future__ import annotations

from dataclasses import dataclass, field


class Histogram:
    """Counts of observations at or below each bound (cumulative, as Prometheus keeps them), their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for j, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[j] += 1


# vLLM's buckets for these histograms (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


@dataclass
class SchedulerStats:
    """Counters since start; `occupancy` = mean live rows per decode step / max_batch."""

    requests: int = 0
    rejected: int = 0
    cancelled: int = 0
    tokens: int = 0
    steps: int = 0
    row_steps: int = 0
    active: int = 0
    queued: int = 0
    failed: int = 0  # requests ended by an error of their own row
    prefill_tokens: int = 0  # prompt tokens computed
    prefix_hits: int = 0  # prompt tokens copied from the prefix cache instead
    prefix_queries: int = 0  # prompt tokens looked up in it
    shared_prefix_rows: int = 0  # rows that attended the pool's shared prefix instead of holding it
    pool_tokens: int = 0  # KV-cache pool: slots in use (rows x width) and in all
    pool_capacity: int = 0
    prompt_tokens: int = 0  # of the requests accepted
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))  # submit to first token, seconds
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))  # between a request's tokens
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))  # submit to last token
