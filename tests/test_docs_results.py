"""Every rendered table in README.md and docs/*.md is what its docs/results/NAME.json renders to (make docs)."""

import json

import pytest

from neoxrt.bench.results import add_results_flag, cpu, write_result
from neoxrt.docs_render import ResultError, load, problems, render_page


def test_rendered_tables_match_their_results():
    assert problems() == [], "run make docs (or remove the marker of a result that is gone)"


def _tree(tmp_path, page_text: str):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# front\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(page_text)
    return tmp_path / "docs" / "results", page


def _write(results_dir, name="speed"):
    return write_result(name, "decode speed", ["engine", "ms/token"], [["neoxrt fp32", 16.7]], command="python -m x",
                        reference="transformers in the same run", reference_rows=[["transformers sdpa", 45.1]],
                        headline=[{"measure": "decode ms/token", "neoxrt": 16.7, "reference": 45.1, "ratio": 0.37}],
                        results_dir=results_dir)


def test_a_block_renders_its_result_and_a_changed_figure_is_stale(tmp_path):
    results_dir, page = _tree(tmp_path, "text\n<!-- results:speed -->\nold\n<!-- /results:speed -->\nafter\n")
    _write(results_dir)
    assert len(problems(tmp_path, results_dir)) == 1  # the block still says "old"
    page.write_text(render_page(page.read_text(), page, results_dir))
    assert problems(tmp_path, results_dir) == []
    text = page.read_text()
    assert "| neoxrt fp32 | 16.7 |" in text and "| transformers sdpa (reference) | 45.1 |" in text
    assert "`python -m x`" in text and "[speed.json](results/speed.json)" in text and text.endswith("after\n")
    page.write_text(text.replace("16.7", "15.0"))
    assert problems(tmp_path, results_dir) == ["docs/page.md: a rendered table differs from its result (run make docs)"]


def test_a_marker_without_its_result_and_a_result_without_a_marker_fail(tmp_path):
    results_dir, page = _tree(tmp_path, "<!-- results:gone -->\n<!-- /results:gone -->\n")
    _write(results_dir, "unused")
    found = problems(tmp_path, results_dir)
    assert any("no result" in p and "gone" in p for p in found), found
    assert any("unused.json: no page" in p for p in found), found


def test_the_headline_block_has_one_row_per_entry(tmp_path):
    results_dir, page = _tree(tmp_path, "<!-- headline:speed -->\n<!-- /headline -->\n<!-- results:speed -->\n"
                                        "<!-- /results:speed -->\n")
    _write(results_dir)
    text = render_page(page.read_text(), page, results_dir)
    assert "| decode ms/token | 16.7 | 45.1 | 0.37 | [speed.json](results/speed.json), " in text


def test_the_result_file_names_its_run(tmp_path):
    path = _write(tmp_path)
    result = json.loads(path.read_text())
    assert result["name"] == "speed" and result["commit"] and result["date"].endswith("UTC")
    assert set(result["cpu"]) == {"model", "flags"} and load("speed", tmp_path) == result
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ResultError, match="2 cells, the columns 1"):
        write_result("bad", "t", ["a"], [[1, 2]], command="c", results_dir=tmp_path)


def test_cpu_keeps_the_vector_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile fma\n")
    assert cpu(info) == {"model": "Some CPU", "flags": ["amx_tile", "avx2", "avx512_vnni", "avx512f"]}


def test_the_results_flag_names_a_default():
    import argparse

    parser = argparse.ArgumentParser()
    add_results_flag(parser, "structured")
    assert parser.parse_args([]).results is None
    assert parser.parse_args(["--results"]).results == "structured"
    assert parser.parse_args(["--results", "other"]).results == "other"


def test_each_benchmark_publishes_a_result_that_renders(tmp_path, monkeypatch):
    """The benchmarks' `--results` on made-up figures of their own shapes (the benchmarks themselves take minutes)."""
    import argparse
    from pathlib import Path

    from neoxrt.bench import int4_accuracy, large, results, run, serve, structured

    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    phase = dict(requests=4, tokens_per_s=44.3, ttft_p50_ms=60.0, ttft_p99_ms=85.0, latency_p50_ms=1475.0,
                 latency_p99_ms=1539.0, ready_s=3.1, rss_mib=1115.0)
    serve.publish({"rows": [dict(phase, server="neoxrt fp32", clients=16, occupancy=0.98),
                            dict(phase, server="vLLM fp32", clients=16, occupancy=None)],
                   "prompt_tokens": 32, "new_tokens": 64, "threads": 2, "machine": "2 CPUs"}, "serve", "python -m s")
    line = dict(model="pythia-160m", case="b1_c128", prompt_ms=125.0, decode_ms=16.7, tokens_per_s=59.9, floor_ms=15.5,
                peak_rss_mib=900.0, precision="fp32")
    run.publish([dict(line, engine="neoxrt-ort-fused-last"), dict(line, engine="optimum-ort", decode_ms=23.2)],
                {"models": {"pythia-160m": {}}, "threads": 2, "rounds": 1, "bandwidth_gbs": 40.0}, "bench", "neoxrt bench")
    export = {"seconds": 167, "peak_anon_bytes": 2**29, "cgroup_peak_bytes": 2**31, "cgroup_oom_kills": 0, "returncode": 0}
    rows = [{"layers": 1, "checkpoint_bytes": 10**9, "copy": {"gb_per_s": 1.5}, "export": export, "export_over_copy": 1.9,
             "int4": {"method": "gptq", "fp16_bytes": 10**9, "int4_bytes": 4 * 10**8, "size_ratio": 0.41,
                      "quantize": export, "rtn": {"seconds": 29.6}, "generate": {"decode_ms_per_token": 66},
                      "floor_ms": 30, "decode_over_floor": 2.2}}]
    large.publish(rows, argparse.Namespace(results="large", limit_gib=3.0, int4_limit_gib=3.5), "python -m l")
    int4_accuracy.publish([{"method": "fp32 export", "perplexity": 128.811, "delta_pct": 0.0},
                           {"method": "gptq, 4-bit, block 32", "perplexity": 128.862, "delta_pct": 0.039}],
                          argparse.Namespace(results="int4-accuracy", text=Path("sotu.txt"), seq_len=256), "python -m i", 400)
    concurrent = {"ms_per_token": {"unconstrained": 1.0, "constrained": 1.1}, "ratio": {"constrained": 1.1},
                  "cost_ratio": {"constrained": 1.05}}
    structured.publish({"command": "python -m t", "shapes": {"m": {"16 concurrent": concurrent}}}, "structured")
    names = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert names == ["bench", "int4-accuracy", "large", "large-int4", "serve", "structured"]
    page = tmp_path / "page.md"
    text = "".join(f"<!-- results:{n} -->\n<!-- /results:{n} -->\n" for n in names)
    rendered = render_page(text + f"<!-- headline:{','.join(names)} -->\n<!-- /headline -->\n", page, tmp_path)
    for expected in ("| neoxrt fp32 | 16 |", "| vLLM fp32 (reference) |", "| optimum-ort (reference) |", "| 0.72 |",
                     "| gptq, 4-bit, block 32 | 128.862 | +0.039 % |", "| 1 | 1.00 | 167 | 1.5 | 1.9 |"):
        assert expected in rendered, expected
