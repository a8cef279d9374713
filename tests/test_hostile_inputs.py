"""The nine malformed inputs of the hostile-inputs issue: each is refused with one line naming the field and
exit code 2, leaving nothing behind (the NaN and int8 weights are in tests/export/test_streaming.py)."""

import json
import shutil

import pytest

from neox_testing import default_checkpoint
from neoxrt import contract as io
from neoxrt.cli import main
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions


def _config_case(tmp_path, **changes):
    folder = tmp_path / "ckpt"
    shutil.copytree(default_checkpoint(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


CONFIG_CASES = {
    "rotary_pct 2.0 (beside partial_rotary_factor 0.25)": ({"rotary_pct": 2.0},
                                                           "partial_rotary_factor=0.25 and rotary_pct=2.0 disagree"),
    "rotary_pct -0.5": ({"rotary_pct": -0.5, "partial_rotary_factor": None}, "rotary_pct must be in (0, 1]"),
    "max_position_embeddings -1": ({"max_position_embeddings": -1}, "max_position_embeddings must be a positive integer"),
    "layer_norm_eps 'tiny'": ({"layer_norm_eps": "tiny"}, "layer_norm_eps must be a finite number, found 'tiny'"),
    "rope base 0": ({"rope_theta": None, "rotary_emb_base": 0}, "must be a finite number >= 1, found 0"),
}


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_bad_config_values_exit_2(name, tmp_path, capsys):
    changes, fragment = CONFIG_CASES[name]
    folder = _config_case(tmp_path, **changes)
    out = tmp_path / "out"
    assert main(["export", str(folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_corrupt_tokenizer_is_refused_before_anything_is_written(tmp_path, capsys):
    folder = _config_case(tmp_path)
    (folder / io.TOKENIZER_FILE).write_text('{"not": "a tokenizer"')
    assert main(["export", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json is not a readable tokenizer" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "art"
    export_checkpoint(default_checkpoint(), out, ExportOptions(), log=lambda *_: None)
    return out


def test_negative_seed_is_one_line(artifact, capsys):
    assert main(["generate", str(artifact), "--prompt", "x", "--seed", "-5", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --seed: expected a seed in [0, 2**63), got -5" in err


@pytest.mark.parametrize("key", ["io", "files", "config"])
def test_manifest_without_a_required_key_is_one_line(artifact, tmp_path, capsys, key):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    manifest = json.loads((art / io.MANIFEST_FILE).read_text())
    del manifest[key]
    (art / io.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert main(["generate", str(art), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"manifest.json lacks {key!r}" in err


def _edited(artifact, tmp_path, edit):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    manifest = json.loads((art / io.MANIFEST_FILE).read_text())
    edit(art, manifest)
    (art / io.MANIFEST_FILE).write_text(json.dumps(manifest))
    return art


def _tokenizer_changed_and_unlisted(art, manifest):
    (art / io.TOKENIZER_FILE).write_text((art / io.TOKENIZER_FILE).read_text().replace('"the"', '"thy"', 1))
    del manifest["files"][io.TOKENIZER_FILE]


MANIFEST_CASES = {
    "entry removed beside a changed file": (_tokenizer_changed_and_unlisted,
                                            "tokenizer.json is in the folder but not in manifest.json 'files'"),
    "a path outside the folder": (lambda art, m: m["files"].update({"../x": "0" * 64}), "'files' names '../x'"),
    "a digest that is not a string": (lambda art, m: m["files"].update({io.MODEL_FILE: 5}), "'files.model.onnx' must be"),
    "a config field retyped": (lambda art, m: m["config"].update(vocab_size="big"),
                               "'config.vocab_size' must be a positive integer, found 'big'"),
    "an eos outside the vocabulary": (lambda art, m: m["config"].update(eos_token_id=10**6), "'config.eos_token_id' must be"),
    "an io dtype unknown": (lambda art, m: m["io"]["inputs"][0].update(dtype="float128"), "'io.inputs[0].dtype' must be"),
    "an empty task (fuzz finding)": (lambda art, m: m.update(task=""), "'task' must be one of text-generation"),
}


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_manifest_sections_are_checked_before_use(artifact, tmp_path, capsys, name):
    edit, fragment = MANIFEST_CASES[name]
    art = _edited(artifact, tmp_path, edit)
    assert main(["generate", str(art), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


def _subcommands() -> list[str]:
    from neoxrt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [[], ["frobnicate"], *([c] for c in _subcommands() if c not in ("bench", "inspect")),
                                  ["inspect"], ["bench", "--rounds", "0"], ["generate", "A", "--top-p", "nan"]])
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "usage:" not in err, err


def test_help_still_exits_0(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--max-new-tokens" in capsys.readouterr().out


# what the fuzz suite found (tests/**/test_fuzz_*.py), kept as plain cases
def test_fp16_export_of_a_weight_past_float16_range_is_named(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from neox_testing import write_variant

    folder = write_variant("gelu_parallel", tmp_path / "big")
    state = load_file(str(folder / "model.safetensors"))
    state["gpt_neox.layers.1.attention.dense.weight"][3, 7] = 1e5
    save_file(state, str(folder / "model.safetensors"))
    out = tmp_path / "out"
    assert main(["export", str(folder), str(out), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt_neox.layers.1.attention.dense.weight has a value past float16's range" in err
    assert "at index [3, 7]" in err and not out.exists() and not list(tmp_path.glob(".out*"))
    assert main(["export", str(folder), str(out)]) == 0  # fp32 holds it


def test_a_tiny_rope_factor_is_refused(tmp_path, capsys):
    folder = _config_case(tmp_path, rope_scaling={"type": "linear", "factor": 2.7e-135})
    assert main(["export", str(folder), str(tmp_path / "out")]) == 2
    assert "rope scaling factor must be a finite number >= 1, found 2.7e-135" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "A", "--num-beams", "9223372036854775808"], "argument --num-beams: expected an integer in [1, 2**31)"),
    (["compare", "{art}", "--against", "{art}", "--seq-len", "1"], "--seq-len must be an integer >= 2, got 1"),
    (["compare", "{art}", "--against", "{art}", "--threshold", "logits_max_abs=nan"], "expected a finite number, got 'nan'"),
])
def test_fuzz_findings_are_one_line(artifact, argv, fragment, capsys):
    assert main([a.format(art=artifact) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
