"""Every `neoxrt` import in the package resolves -- the lazy ones inside functions included, which no other
test reaches on a machine without a GPU (a `from neoxrt.export import trt_plugin` inside the TensorRT build
once named a module that did not exist). Static: each module's AST is read, nothing of it is run."""

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def package_dirs() -> dict[str, Path]:
    """{package name: folder} from pyproject's package-dir (neoxrt.export -> export/, ...)."""
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11 (tomllib)")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setup["package-dir"].items()}


def package_modules() -> dict[str, Path]:
    """{module name: file} of every module of every installed package."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def neoxrt_imports(module: str, path: Path):
    """(line, imported module, [names]) for every import of a neoxrt module anywhere in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "neoxrt":
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([target] if target else []))
            if target.split(".")[0] == "neoxrt":
                yield node.lineno, target, [a.name for a in node.names]


def unresolved(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in sorted(modules.items()):
        for line, target, names in neoxrt_imports(module, path):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line}"
            if importlib.util.find_spec(target) is None:
                problems.append(f"{where}: no module {target}")
                continue
            if not names:
                continue
            loaded = importlib.import_module(target)
            for name in names:
                if name == "*" or hasattr(loaded, name):
                    continue
                if not hasattr(loaded, "__path__") or importlib.util.find_spec(f"{target}.{name}") is None:
                    problems.append(f"{where}: {target} has no {name}")
    return problems


def test_the_walk_sees_every_stage_and_the_lazy_imports():
    modules = package_modules()
    assert {"neoxrt.cli", "neoxrt.tensorrt_api", "neoxrt.export.engine", "neoxrt.runtime.trt_session",
            "neoxrt.model", "neoxrt.calibration.calibrate", "neoxrt.report.compare"} <= set(modules)
    found = neoxrt_imports("neoxrt.export.engine", modules["neoxrt.export.engine"])
    lazy = {f"{target}.{name}" for _, target, names in found for name in names}
    assert "neoxrt.tensorrt_api" in lazy  # imported inside build_engine_artifact only


def test_every_neoxrt_import_resolves():
    problems = unresolved(package_modules())
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_missing_module_and_a_missing_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from neoxrt.export import trt_plugin\n    from neoxrt.tensorrt_api import no_such\n"
                   "    import neoxrt.no_such_module\n")
    problems = unresolved({"neoxrt.bad": bad})
    assert any("neoxrt.export has no trt_plugin" in p for p in problems)
    assert any("neoxrt.tensorrt_api has no no_such" in p for p in problems)
    assert any("no module neoxrt.no_such_module" in p for p in problems)
