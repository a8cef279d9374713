"""`neoxrt triton-repo` and the serving path's imports (no server needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from neoxrt.cli import main
from neoxrt.serve.request import INPUTS, OUTPUTS, RequestError, parse_request


def test_triton_repo_writes_a_python_backend_repository(artifact, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(artifact), str(repo), "--name", "pythia", "--max-batch", "8"]) == 0
    config = (repo / "pythia" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "decoupled: true" in config and 'string_value: "8"' in config
    for field in (*INPUTS, *OUTPUTS):
        assert f'name: "{field.name}"' in config
    assert "TritonPythonModel" in (repo / "pythia" / "1" / "model.py").read_text()
    copied = repo / "pythia" / "1" / "artifact"
    assert not copied.is_symlink() and json.loads((copied / "manifest.json").read_text())["stage"] == "export"
    assert main(["triton-repo", str(artifact), str(repo)]) == 2  # exists, no --force
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["triton-repo", str(tmp_path / "missing"), str(tmp_path / "r2")]) == 2
    assert main(["triton-repo", str(artifact), str(tmp_path / "r3"), "--name", "a/b"]) == 2
    assert "--name must be" in capsys.readouterr().err and not (tmp_path / "r3").exists()
    assert main(["triton-repo", str(artifact), str(tmp_path / "r4"), "--openai-port", "70000"]) == 2
    assert "--openai-port must be in [0, 65535]" in capsys.readouterr().err and not (tmp_path / "r4").exists()
    assert main(["triton-repo", str(artifact), str(tmp_path / "r5"), "--openai-port", "8080"]) == 0
    assert 'key: "openai_port" value: { string_value: "8080" }' in (tmp_path / "r5" / "neoxrt" / "config.pbtxt").read_text()


def test_triton_repo_carries_the_pool_options(artifact, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(artifact), str(repo), "--kv-cache-memory", "1.5", "--max-prefill-tokens", "64",
                 "--no-prefix-cache"]) == 0
    config = (repo / "neoxrt" / "config.pbtxt").read_text()
    for key, value in (("kv_cache_memory", "1.5"), ("max_prefill_tokens", "64"), ("prefix_cache", "0")):
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in config
    assert main(["triton-repo", str(artifact), str(tmp_path / "r2"), "--max-prefill-tokens", "0"]) == 2
    assert "--max-prefill-tokens: expected an integer in [1, 2**31), got 0" in capsys.readouterr().err


def test_serve_says_which_cache_path_an_artifact_gets(artifact, static_artifact):
    from neoxrt.serve.server import cache_line

    assert "export with the defaults for the KV-cache pool" in cache_line(artifact)
    assert "KV-cache pool" in cache_line(static_artifact) and "dynamic" not in cache_line(static_artifact)
    assert "attention: GroupQueryAttention over each row's own slots" in cache_line(static_artifact)


def test_serve_says_which_cache_path_an_engine_folder_gets(static_artifact, tmp_path):
    """An engine folder of a static-cache build has a manifest with the static io but no model.onnx."""
    import json

    from neoxrt.serve.server import cache_line

    manifest = json.loads((static_artifact / "manifest.json").read_text())
    manifest.update(stage="build", files={"model.engine": "0" * 64})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "model.engine").write_bytes(b"engine")
    assert "attention: the TensorRT engine's, the pool in device memory" in cache_line(tmp_path)


def test_serve_refuses_clashing_ports(artifact, capsys):
    assert main(["serve", str(artifact), "--http-port", "18990", "--openai-port", "18990"]) == 2
    assert "must differ, got 18990, 8001, 8002, 18990" in capsys.readouterr().err


def test_serving_path_imports_neither_onnx_nor_torch():
    code = ("import sys; from neoxrt.cli import build_parser; build_parser('serve').parse_args(['serve', 'x']); "
            "import neoxrt.serve.server, neoxrt.serve.backend, neoxrt.serve.repository, neoxrt.serve.openai_app; "
            "print(sorted(m for m in ('onnx', 'torch', 'transformers', 'neoxrt.export') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def request(**values):
    arrays = {k: np.array(v if isinstance(v, list) else [v]) for k, v in values.items()}
    return parse_request(arrays.get)


def test_request_fields_map_to_generation_options():
    parsed = request(text_input=b"Hi", max_tokens=np.int32(5), temperature=np.float32(0.5), top_k=np.int32(3),
                     seed=np.int64(9), stop=[b"\n", b"."], stream=True, ignore_eos=True)
    assert parsed.prompt == "Hi" and parsed.stream
    assert parsed.options == dict(max_new_tokens=5, temperature=0.5, top_k=3, seed=9, stop_strings=("\n", "."),
                                  ignore_eos=True)
    assert request(text_input=b"Hi").options == {"max_new_tokens": 32} and not request(text_input=b"Hi").stream


@pytest.mark.parametrize("values, message", [
    (dict(max_tokens=5), "text_input is required"),
    (dict(text_input=b""), "text_input is empty"),
    (dict(text_input=b"a", max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(text_input=b"a", max_tokens=[1, 2]), "max_tokens must be one value, got 2"),
    (dict(text_input=b"a", top_k=-2), "top_k must be an integer >= 0, got -2"),
    (dict(text_input=b"a", seed=1.5), "seed must be an integer in [0, 9223372036854775808"),
    (dict(text_input=b"a", stop=[b""]), "stop must not contain an empty string"),
])
def test_bad_fields_are_named(values, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace("[", r"\[")):
        request(**values)
