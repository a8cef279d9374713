"""A one-line progress bar with an ETA on stderr (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30):
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        filled = int(self.width * done / self.total)
        tail = f" {elapsed:.0f}s" if done >= self.total else f" ETA {eta:.0f}s" if done else ""
        end = "\n" if done >= self.total else ""
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}{tail}{end}")
        sys.stderr.flush()
