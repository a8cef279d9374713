"""Atomic output folders: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from neoxrt.errors import NeoxrtError


def check_output_dir(out_dir: Path, force: bool, error: type[NeoxrtError]) -> None:
    """Refuse an existing output without --force, or a parent we cannot write to."""
    if out_dir.exists() and not force:
        raise error(f"output {out_dir} already exists; pass --force to overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"output {out_dir} exists and is not a folder")
    parent = out_dir.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK) or not probe.is_dir():
        raise error(f"cannot write to {probe} (expected a writable folder for {out_dir})")


@contextlib.contextmanager
def atomic_dir(out_dir: Path, force: bool, error: type[NeoxrtError]):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force, error)
    out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
