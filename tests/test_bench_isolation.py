"""Everything that measures lives in bench/ and is imported by nothing in the product (STYLE.md, issue 34)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("model", "export", "calibration", "runtime", "serve", "report", "neoxrt")
# `neoxrt bench ...` hands its arguments to the benchmark's own parser: the one way in, lazily, for that command only
ALLOWED = {("neoxrt/cli.py", "neoxrt.bench.run")}


def bench_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "neoxrt.bench" or a.name.startswith("neoxrt.bench.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and (module == "neoxrt.bench" or module.startswith("neoxrt.bench.")):
                found.append(module)
            elif node.level == 0 and module == "neoxrt" and any(a.name == "bench" for a in node.names):
                found.append("neoxrt.bench")
            elif node.level > 0 and (module == "bench" or module.startswith("bench.")
                                     or (not module and any(a.name == "bench" for a in node.names))):
                found.append("." * node.level + module)
    return found


def test_no_product_module_imports_bench():
    offenders = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            offenders += [f"{name}: {m}" for m in bench_imports(path) if (name, m) not in ALLOWED]
    assert offenders == [], "the product imports the benchmarks: " + ", ".join(offenders)


def test_the_check_sees_each_spelling(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import neoxrt.bench.serve\nfrom neoxrt.bench import run\nfrom neoxrt import bench\nfrom ..bench import x\n"
                      "import neoxrt.benchmarks_are_elsewhere\n")
    assert bench_imports(source) == ["neoxrt.bench.serve", "neoxrt.bench", "neoxrt.bench", "..bench"]
