"""`make bench-structured` and the engine comparison, run small: every row measured, the constraint reaching the
same token count as the unconstrained runs (so the ratio compares like with like), every test grammar compiled."""

import pytest

from neoxrt.bench import structured, structured_engines


def test_bench_structured_counts_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(structured, "ROOT", tmp_path)
    rows = structured.measure("pythia-14m-sotu", rounds=1, tokens=12, threads=1)
    assert set(rows) == {"batch 1", "16 concurrent"}
    for row in rows.values():
        assert row["tokens"]["constrained"] == row["tokens"]["unconstrained"]
        assert 0 < row["loop_thread_ms_per_token"]["constrained"] < row["ms_per_token"]["constrained"]
        assert all(v > 0 for v in row["ratio"].values()) and all(v > 0 for v in row["ms_per_token"].values())


def test_llguidance_compiles_every_test_grammar():
    rows = structured_engines.measure("llguidance", tokens=8, repeats=1)
    assert [r["grammar"] for r in rows] == [g[0] for g in structured_engines.GRAMMARS]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_xgrammar_is_not_torch_free():
    """Why llguidance: xgrammar's package imports torch (skipped where xgrammar is not installed)."""
    import subprocess
    import sys

    pytest.importorskip("xgrammar")
    code = "import sys, xgrammar; sys.exit(0 if 'torch' in sys.modules else 1)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
