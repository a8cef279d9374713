"""The bench's arithmetic (no timing here: speed is measured by `make bench`, never asserted in tests)."""

import torch

from neoxrt.bench.run import decode_weight_bytes, markdown, summarise, targets
from neoxrt.bench.shapes import SHAPES
from neoxrt.model import NeoX, NeoXConfig


def test_decode_weight_bytes_counts_every_matrix_but_the_embedding():
    config = NeoXConfig(**SHAPES["pythia-160m"])
    with torch.device("meta"):
        model = NeoX(config)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n != "embed.weight")
    assert decode_weight_bytes(config.to_dict()) == matrices * 4
    head = config.vocab_size * config.hidden_size  # the screened head reads its INT8 copy
    assert decode_weight_bytes(config.to_dict(), 4.0, 1.0) == (matrices - head) * 4 + head


def test_speculative_engines_name_a_draft_and_a_target():
    from neoxrt.bench.run import ENGINES, NEOXRT_VARIANTS, SCREENED_SPEC, SPEC_ENGINES

    for engine in [e for e in ENGINES if e.startswith("neoxrt-spec-")] + ["neoxrt-spec-int8" + SCREENED_SPEC]:
        draft, _ = SPEC_ENGINES[engine.removeprefix("neoxrt-spec-").removesuffix(SCREENED_SPEC)]
        assert draft is None or draft in NEOXRT_VARIANTS
    assert "fused-screened" in NEOXRT_VARIANTS


def _result(ours_ms, optimum_ms, sdpa_ms, long_ms):
    def engine(decode, prompt, long=None):
        cases = {"b1_c128": {"prompt_ms": [prompt] * 5, "decode_ms_per_token": [decode] * 5, "batch": 1, "context": 128}}
        if long:
            cases["b1_c1024"] = {"prompt_ms": [prompt * 8], "decode_ms_per_token": [long] * 5, "batch": 1, "context": 1024}
        return {"cases": cases, "peak_rss_mib": 100.0}

    config = NeoXConfig(**SHAPES["pythia-160m"]).to_dict()
    return {"machine": {"cpu": "x", "cores": 2, "isa": [], "versions": {}}, "threads": 2, "bandwidth_gbs": 20.0,
            "models": {"pythia-160m": {"config": config, "engines": {
                "neoxrt-ort-decomposed": engine(ours_ms, 100.0, long_ms),
                "optimum-ort": engine(optimum_ms, 200.0),
                "hf-sdpa": engine(sdpa_ms, 150.0)}}}}


def test_targets_are_ratios_against_the_anchors_and_the_floor():
    result = _result(ours_ms=30.0, optimum_ms=45.0, sdpa_ms=70.0, long_ms=33.0)
    lines = summarise(result, result["bandwidth_gbs"])
    got = {t["target"].split(" (")[0]: (t["value"], t["met"]) for t in targets(lines)}
    floor_ms = decode_weight_bytes(result["models"]["pythia-160m"]["config"]) / 20e9 * 1e3
    assert got["decode neoxrt-ort-decomposed / optimum-ort"] == (round(30 / 45, 3), True)
    assert got["decode neoxrt-ort-decomposed / hf-sdpa"] == (round(30 / 70, 3), True)
    assert got["prompt(128) neoxrt-ort-decomposed / optimum-ort"] == (0.5, True)
    assert got["decode neoxrt-ort-decomposed / weight-bandwidth floor"] == (round(30 / floor_ms, 3), 30 / floor_ms <= 1.25)
    assert got["decode at context 1024 / context 128"] == (1.1, True)
    result["targets"] = targets(lines)
    assert "| decode neoxrt-ort-decomposed / optimum-ort | 0.667 | <= 0.75 | yes |" in markdown(result, lines)


def test_a_slow_engine_misses_its_target():
    lines = summarise(_result(ours_ms=40.0, optimum_ms=45.0, sdpa_ms=70.0, long_ms=80.0), 20.0)
    met = {t["target"].split(" (")[0]: t["met"] for t in targets(lines)}
    assert not met["decode neoxrt-ort-decomposed / optimum-ort"]
    assert not met["decode at context 1024 / context 128"]


def test_int8_rows_use_the_int8_floor_and_get_their_targets():
    result = _result(ours_ms=30.0, optimum_ms=45.0, sdpa_ms=70.0, long_ms=33.0)
    engines = result["models"]["pythia-160m"]["engines"]
    base = engines["neoxrt-ort-decomposed"]

    def like(ms, prompt_ms=100.0):
        case = {**base["cases"]["b1_c128"], "decode_ms_per_token": [ms] * 5, "prompt_ms": [prompt_ms] * 5}
        return {"cases": {"b1_c128": case}, "peak_rss_mib": 50.0}

    engines.update({"neoxrt-ort-fused": like(32.0), "neoxrt-ort-int8": like(10.0), "neoxrt-ort-int8-dynamic": like(11.0),
                    "neoxrt-ort-int8-weights": like(9.0, prompt_ms=150.0), "optimum-ort-int8-dynamic": like(20.0)})
    lines = summarise(result, 20.0)
    rows = {x["engine"]: x for x in lines if x["case"] == "b1_c128"}
    assert rows["neoxrt-ort-int8"]["floor_ms"] * 4 == rows["neoxrt-ort-fused"]["floor_ms"]
    got = {t["target"]: (t["value"], t["met"]) for t in targets(lines)}
    assert got["INT8 decode neoxrt-ort-int8 / optimum-ort-int8-dynamic"] == (0.5, True)
    assert got["INT8 decode neoxrt-ort-int8 / neoxrt-ort-int8-dynamic"] == (round(10 / 11, 3), True)
    assert got["INT8 decode neoxrt-ort-int8 / fp32 neoxrt-ort-fused (1.6x faster)"] == (round(10 / 32, 3), True)
    # weights-only gets the same targets, and a faster decode does not hide a slower prompt
    assert got["INT8 decode neoxrt-ort-int8-weights / neoxrt-ort-int8-dynamic"] == (round(9 / 11, 3), True)
    assert got["INT8 prompt(128) neoxrt-ort-int8-weights / neoxrt-ort-int8-dynamic"] == (1.5, False)
    # the fp32 targets still use the best fp32 engine, not the INT8 one
    assert "decode neoxrt-ort-decomposed / optimum-ort" in got


def test_every_neoxrt_engine_names_a_valid_export_and_calibration():
    from neoxrt.bench.run import ENGINES, NEOXRT_VARIANTS
    from neoxrt.calibration.options import CalibrationOptions
    from neoxrt.export.options import ExportOptions

    for engine in (e for e in ENGINES if e.startswith("neoxrt-ort-")):
        export_name, export_options, calibration = NEOXRT_VARIANTS[engine.removeprefix("neoxrt-ort-")]
        ExportOptions(**export_options)
        if calibration is not None:
            CalibrationOptions(**calibration)


def test_rounds_are_pooled_per_case():
    from neoxrt.bench.run import merge_rounds

    a = {"cases": {"b1_c128": {"prompt_ms": [1.0], "decode_ms_per_token": [10.0, 11.0], "batch": 1, "context": 128}},
         "peak_rss_mib": 100.0}
    b = {"cases": {"b1_c128": {"prompt_ms": [2.0], "decode_ms_per_token": [30.0], "batch": 1, "context": 128}},
         "peak_rss_mib": 120.0}
    merged = merge_rounds([a, b])
    assert merged["cases"]["b1_c128"]["decode_ms_per_token"] == [10.0, 11.0, 30.0]
    assert merged["cases"]["b1_c128"]["prompt_ms"] == [1.0, 2.0] and merged["peak_rss_mib"] == 120.0
    assert a["cases"]["b1_c128"]["decode_ms_per_token"] == [10.0, 11.0]  # inputs untouched


def test_speculative_rows_pool_acceptance_and_int4_rows_stay_out_of_the_fp32_targets():
    from neoxrt.bench.run import merge_rounds

    result = _result(ours_ms=30.0, optimum_ms=45.0, sdpa_ms=70.0, long_ms=33.0)
    engines = result["models"]["pythia-160m"]["engines"]
    case = engines["neoxrt-ort-decomposed"]["cases"]["b1_c128"]

    def spec_round(ms, rounds, drafted, accepted):
        stats = {"rounds": rounds, "drafted": drafted, "accepted": accepted}
        return {"cases": {"b1_c128": {**case, "decode_ms_per_token": [ms], "spec_stats": stats}}, "peak_rss_mib": 1.0}

    engines["neoxrt-ort-fused"] = {"cases": {"b1_c128": {**case, "decode_ms_per_token": [40.0]}}, "peak_rss_mib": 1.0}
    engines["neoxrt-spec-int4"] = merge_rounds([spec_round(20.0, 10, 40, 30), spec_round(20.0, 6, 24, 10)])
    engines["neoxrt-ort-int4-weights"] = {"cases": {"b1_c128": {**case, "decode_ms_per_token": [5.0]}},
                                          "peak_rss_mib": 1.0}
    lines = summarise(result, 20.0)
    spec = _find_row(lines, "neoxrt-spec-int4")["speculative"]
    assert (spec["rounds"], spec["drafted"], spec["accepted"]) == (16, 64, 40)
    assert spec["acceptance"] == 40 / 64 and spec["tokens_per_verify"] == 56 / 16
    assert _find_row(lines, "neoxrt-ort-int4-weights")["precision"] == "int4"
    got = {t["target"]: (t["value"], t["met"]) for t in targets(lines)}
    assert got["speculative decode neoxrt-spec-int4 / fp32 neoxrt-ort-fused"] == (0.5, True)
    assert "decode neoxrt-ort-int4-weights / optimum-ort" not in got  # the fastest fp32 engine is still ours in fp32
    result["targets"] = targets(lines)
    assert "neoxrt-spec-int4 b1_c128: 40 of 64 guesses accepted (0.62), 3.50 tokens per verify step" in markdown(
        result, lines)


def _find_row(lines, engine):
    return next(x for x in lines if x["engine"] == engine and x["case"] == "b1_c128")


def test_heads_accuracy_compares_labels_and_logits_with_the_reference():
    import numpy as np

    from neoxrt.bench.heads import ENGINES, INT8_VARIANTS, accuracy
    from neoxrt.calibration.options import CalibrationOptions

    reference = np.array([[1.0, 0.0], [0.0, 2.0], [0.5, 0.4]], np.float32)
    assert accuracy(reference.copy(), reference) == {"label_agreement": "3/3", "max_abs_logit_diff": 0.0}
    flipped = reference + np.array([[0, 0], [0, 0.25], [0, 0.2]], np.float32)  # the last row's label flips
    got = accuracy(flipped, reference)
    assert got["label_agreement"] == "2/3" and abs(got["max_abs_logit_diff"] - 0.25) < 1e-6
    assert accuracy(reference, None)["label_agreement"] is None
    for engine, options in INT8_VARIANTS.items():
        assert engine in ENGINES
        CalibrationOptions(**options)


def test_benches_remake_artifacts_of_an_older_graph(tmp_path):
    """A cached artifact is reused only when its manifest's graph_version is the exporter's: an export made
    before the graph changed (no version, or an older one) is re-made."""
    import json

    from neoxrt.bench.shapes import fresh
    from neoxrt.export.exporter import GRAPH_VERSION

    assert not fresh(tmp_path)
    for version, expected in ((None, False), (GRAPH_VERSION - 1, False), (GRAPH_VERSION, True)):
        body = {"stage": "export"} if version is None else {"stage": "export", "graph_version": version}
        (tmp_path / "manifest.json").write_text(json.dumps(body))
        assert fresh(tmp_path) is expected
