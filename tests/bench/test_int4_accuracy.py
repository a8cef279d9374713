"""bench.int4_accuracy: the fp32 export against itself is 0 %, a quantized artifact is measured on the same windows."""

import json

from neox_testing import default_checkpoint
from neoxrt.bench.int4_accuracy import main
from neoxrt.cli import main as cli
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions


def test_rows_against_the_fp32_export(tmp_path, capsys):
    fp32 = tmp_path / "fp32"
    export_checkpoint(default_checkpoint(), fp32, ExportOptions(), log=lambda *_: None)
    assert cli(["calibrate", str(fp32), str(tmp_path / "rtn"), "--weights-only", "--bits", "4", "--method", "rtn"]) == 0
    out = tmp_path / "rows.json"
    assert main([str(fp32), str(fp32), str(tmp_path / "rtn"), "--windows", "4", "--seq-len", "64", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == 4
    reference, again, rtn = result["rows"]
    assert again["delta_pct"] == 0.0 and again["perplexity"] == reference["perplexity"]
    assert rtn["method"] == "rtn, 4-bit, block 32" and 0 < abs(rtn["delta_pct"]) < 5
    assert "| rtn | rtn, 4-bit, block 32 |" in capsys.readouterr().out
