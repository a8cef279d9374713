"""The command line's layout: one CLI module per stage (COMMANDS, ADDERS), `neoxrt/cli.py` mapping each command
to its stage and importing that stage alone; no stage CLI imports `neoxrt.cli` back."""

import argparse
import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from neoxrt import cli

ROOT = Path(__file__).resolve().parents[1]


def _registered(module) -> set[str]:
    sub = argparse.ArgumentParser().add_subparsers()
    for add in module.ADDERS:
        add(sub)
    return set(sub.choices)


@pytest.mark.parametrize("stage", cli.STAGES)
def test_each_stage_module_registers_exactly_its_commands(stage):
    module = importlib.import_module(stage)
    assert _registered(module) == set(module.COMMANDS)
    assert {c for c, s in cli.COMMAND_STAGE.items() if s == stage} == set(module.COMMANDS)


def test_no_stage_cli_imports_the_cli_core():
    for stage in cli.STAGES:
        path = Path(importlib.import_module(stage).__file__)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "neoxrt.cli", f"{path}: imports neoxrt.cli (a cycle)"
            if isinstance(node, ast.Import):
                assert all(a.name != "neoxrt.cli" for a in node.names), f"{path}: imports neoxrt.cli (a cycle)"


LOADED = ("import sys, json; from neoxrt.cli import build_parser; build_parser(sys.argv[1]); "
          "print(json.dumps(sorted(m for m in sys.modules if m.endswith('.cli') or m in ('onnx', 'torch'))))")


@pytest.mark.parametrize("command", ["generate", "compare", "serve"])
def test_a_command_imports_its_stage_alone(command):
    done = subprocess.run([sys.executable, "-c", LOADED, command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout))
    stage = cli.COMMAND_STAGE[command]
    assert loaded & set(cli.STAGES) == {stage}, loaded
    if command in ("generate", "serve"):  # the torch-free paths
        assert not loaded & {"onnx", "torch"}, loaded


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in [*cli.COMMAND_STAGE, "bench"]:
        assert command in out
