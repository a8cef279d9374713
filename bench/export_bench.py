"""`make bench-export`: time and peak RSS of exporting the Pythia-160m shape (random weights), per flavour,
each in a fresh process so the RSS is the export's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neoxrt.bench.shapes import shape_checkpoint


def main() -> int:
    root = Path("artifacts/bench")
    ckpt = shape_checkpoint("pythia-160m", root)
    rows = []
    for attention in ("decomposed", "fused", "plugin"):
        for dtype in ("fp32", "fp16"):
            if attention == "plugin" and dtype == "fp16":
                continue
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                child = subprocess.Popen([sys.executable, "-m", "neoxrt", "export", str(ckpt), f"{tmp}/out",
                                          "--attention", attention, "--dtype", dtype], stdout=subprocess.DEVNULL)
                _, status, usage = os.wait4(child.pid, 0)
                seconds = time.perf_counter() - start
                if status:
                    return 1
                rss = usage.ru_maxrss / 1024  # this child's own peak (KiB on Linux)
                size = sum(p.stat().st_size for p in Path(tmp, "out").iterdir()) / 2**20
            rows.append({"attention": attention, "dtype": dtype, "seconds": round(seconds, 1),
                         "peak_rss_mib": round(rss), "artifact_mib": round(size)})
            print(f"pythia-160m {attention:10s} {dtype}: {seconds:5.1f} s, peak RSS {rss:6.0f} MiB, "
                  f"artifact {size:5.0f} MiB")
    Path("artifacts/bench/export.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
