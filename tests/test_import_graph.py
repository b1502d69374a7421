"""The package's rooms: no two modules of tc_export import each other, directly or around a circle; every import
names a module that exists (none left on a moved path); the top level holds only folders and a few modules.

Every import counts, at module level or deferred inside a function (a deferred import hides a circle from the
interpreter, not from the design: ``export/bundle.py`` once ran ``pipeline.run_job`` while ``run_job`` called the
bundle). Imports under ``if TYPE_CHECKING:`` are annotations only and do not count. A package's ``__init__``
importing its own modules (the registries' "every module registers itself") is not a circle unless one of them
imports the package back.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tc_export"
TOP_LEVEL_MODULES = {"__init__.py", "errors.py", "registry.py"}  # registry.py: shared by models, methods, recipes


def modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package) for every module under ``package``."""
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _guarded_by_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path, is_package: bool, known: dict) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its file."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    root = name.split(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _guarded_by_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    found.add(_longest_known(alias.name, known))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == root:
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if submodule in known else _longest_known(target, known))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    found.discard("")
    return found


def _longest_known(dotted: str, known: dict) -> str:
    parts = dotted.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def circles(package: Path) -> list[list[str]]:
    """The strongly connected groups of two or more modules in the import graph (Tarjan)."""
    known = modules(package)
    graph = {name: imports(name, path, is_package, known) for name, (path, is_package) in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            connect(name)
    return groups


def test_no_module_imports_another_that_imports_it_back():
    found = circles(PACKAGE)
    assert not found, "import circles in tc_export:\n" + "\n".join(" <-> ".join(group) for group in found)


def test_the_scan_finds_circles_deferred_and_direct(tmp_path):
    """The scan itself: a deferred circle and a three-module circle are found, a TYPE_CHECKING import and a
    package importing its own modules are not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\nfrom . import sub\n")
    (package / "a.py").write_text("from .b import g\ndef f():\n    return g()\n")
    (package / "b.py").write_text("def g():\n    from .a import f\n    return f\n")  # deferred: a <-> b
    (package / "sub" / "__init__.py").write_text("from . import x\n")
    (package / "sub" / "x.py").write_text("from . import y\n")
    (package / "sub" / "y.py").write_text("import pkg.sub.z\n")
    (package / "sub" / "z.py").write_text("from ..sub.x import name\n")  # x -> y -> z -> x
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n")
    (package / "d.py").write_text("from .c import C\n")
    assert sorted(circles(package)) == [["pkg.a", "pkg.b"], ["pkg.sub.x", "pkg.sub.y", "pkg.sub.z"]]


def stale_imports(files: list[Path], package: Path) -> list[str]:
    """Imports of ``package`` modules (anywhere in a file, deferred ones included) that name no module file: an
    old path after a module moved (docs/design.md, "Moved modules")."""
    known = modules(package)
    root = package.name
    stale = []
    for path in files:
        inside = package in path.parents
        if inside:
            parts = list(path.relative_to(package.parent).with_suffix("").parts)
            base = parts[:-1]  # the package holding this file (an __init__'s own package)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and inside:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and not node.level:
                target = node.module or ""
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == root and alias.name not in known:
                        stale.append(f"{path}:{node.lineno}: import {alias.name}")
                continue
            else:
                continue
            if target.split(".")[0] == root and target not in known:
                stale.append(f"{path}:{node.lineno}: from {target} import ...")
    return stale


def test_every_import_names_an_existing_module():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    stale = stale_imports(files, PACKAGE)
    assert not stale, "imports of moved or missing modules (see docs/design.md, Moved modules):\n" + "\n".join(stale)


def test_stale_import_check_sees_an_old_path(tmp_path):
    package = tmp_path / "pkg"
    (package / "job").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "job" / "__init__.py").write_text("")
    (package / "job" / "pipeline.py").write_text("def run():\n    from ..compress import x\n    from . import y\n")
    (package / "job" / "y.py").write_text("from pkg.job.pipeline import run\nimport pkg.pipeline\n")
    stale = stale_imports([package / "job" / "pipeline.py", package / "job" / "y.py"], package)
    assert [line.split(": ", 1)[1] for line in stale] == ["from pkg.compress import ...", "import pkg.pipeline"]


def test_top_level_holds_folders_and_few_modules():
    loose = {path.name for path in PACKAGE.glob("*.py")} - TOP_LEVEL_MODULES
    assert not loose, f"modules at the top of tc_export: {sorted(loose)}; put each in the folder of its concern"
