"""A real tritonserver (the one nvidia-pytriton bundles) on 127.0.0.1 for the serving tests: started once per
module through `neoxrt serve`, every wait bounded, stopped by pid."""

from __future__ import annotations

import pytest
from serve_testing import start_server, stop_server

from neox_testing import default_checkpoint
from neoxrt.export.exporter import export_checkpoint
from neoxrt.export.options import ExportOptions


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "default"
    export_checkpoint(default_checkpoint(), out, ExportOptions(attention="decomposed"), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def static_artifact(tmp_path_factory):
    """The same model exported with --kv-cache static: the scheduler's KV-cache pool."""
    out = tmp_path_factory.mktemp("serve") / "static"
    export_checkpoint(default_checkpoint(), out, ExportOptions(kv_cache="static"), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    """`neoxrt serve` in a child process; its temporary folder under a fresh TMPDIR so a test can check it is
    gone. Stopped by pid (SIGTERM, then SIGKILL) at the end whatever the tests did."""
    srv = start_server(artifact, tmp_path_factory.mktemp("serve-tmp"))
    yield srv
    stop_server(srv)
