"""docs/CLI.md is what the parsers render (make docs); a changed option without make docs fails here."""

from pathlib import Path

from neoxrt.cli_reference import main, render

PAGE = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"


def test_cli_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == render(), "docs/CLI.md is stale: run make docs"


def test_every_subcommand_and_a_known_flag_are_rendered(tmp_path):
    text = render()
    for command in ("inspect", "export", "calibrate", "generate", "compare", "serve", "triton-repo", "build"):
        assert f"## neoxrt {command}\n" in text, command
    assert "`--kv-cache-memory GIB`" in text and "INT4: gptq, awq, rtn, ort-nbits (default gptq" in text
    stale = tmp_path / "CLI.md"
    stale.write_text("old")
    assert main([str(stale), "--check"]) == 1 and stale.read_text() == "old"
    assert main([str(stale)]) == 0 and main([str(stale), "--check"]) == 0
