"""The import rules of ARCHITECTURE.md, checked by walking every module's imports.

- nothing below the façade (``manager.py``) imports it, or the package that re-exports it;
- ``serving/`` imports at run time only ``lora/``, ``catalog/``, ``serving/`` and the leaf modules;
- no module imports another module's private name;
- no import cycle, except through imports made only for type checking;
- no import of an adapters_mgr module inside a function, except the façade's (and the CLI's ``demo``
  command's) lazy imports of torch-heavy modules; those make no cycle either (they are in the graph);
- importing the CLI does not import torch (what the façade's lazy imports are for).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adapters_mgr"
LEAVES = {"adapters_mgr.errors", "adapters_mgr.faults", "adapters_mgr.progress"}
# the façade and the CLI entry (its `demo` command): torch-heavy modules imported on first use
LAZY_ALLOWED = {"adapters_mgr.manager", "adapters_mgr.cli.main"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of the package
    names: tuple[str, ...]
    where: str  # "top", "type" (under TYPE_CHECKING) or "function"
    line: int


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _scopes(tree: ast.AST) -> tuple[set[int], set[int]]:
    in_function: set[int] = set()
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    return in_function, type_only


def _imports() -> list[Import]:
    found: list[Import] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        in_function, type_only = _scopes(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            where = "function" if id(node) in in_function else "type" if id(node) in type_only else "top"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "adapters_mgr":
                        found.append(Import(module, alias.name, (), where, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "adapters_mgr":
                    continue
                names = tuple(a.name for a in node.names)
                submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES]
                plain = tuple(n for n in names if f"{source}.{n}" not in MODULES)
                if plain or not submodules:
                    found.append(Import(module, source, plain, where, node.lineno))
                for sub in submodules:
                    found.append(Import(module, sub, (), where, node.lineno))
    return found


IMPORTS = _imports()


def _graph() -> dict[str, set[str]]:
    """Run-time import edges (type-only ones left out), module to the module it names.

    The parent packages Python runs first are not edges: ``adapters_mgr/__init__`` re-exports the
    façade, so counting them would make every module part of one cycle, and no tool reads them so.
    """
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.where != "type" and imp.target in MODULES and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_walk_sees_the_package():
    assert {"adapters_mgr.manager", "adapters_mgr.workflows.update", "adapters_mgr.serving.scorer",
            "adapters_mgr.catalog.nodes", "adapters_mgr.lora.trainer", "adapters_mgr.cli.main"} <= set(MODULES)
    assert any(i.importer == "adapters_mgr.manager" and i.target == "adapters_mgr.workflows.update"
               for i in IMPORTS)
    # the cycle finder finds a planted cycle
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_except_type_only():
    assert _cycles(_graph()) == []


def test_nothing_below_the_facade_imports_it():
    above = {"adapters_mgr", "adapters_mgr.manager", "adapters_mgr.demo"}
    offenders = [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.target in ("adapters_mgr", "adapters_mgr.manager") and i.where != "type"
        and i.importer not in above and not i.importer.startswith("adapters_mgr.cli")
    ]
    assert offenders == []


def test_serving_imports_only_lora_and_catalog():
    allowed = ("adapters_mgr.lora", "adapters_mgr.catalog", "adapters_mgr.serving")
    offenders = [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in IMPORTS
        if i.importer.startswith("adapters_mgr.serving") and i.where != "type"
        and not (i.target.startswith(allowed) or i.target in LEAVES)
    ]
    assert offenders == []


def test_no_module_imports_another_modules_private_name():
    offenders = [
        f"{i.importer}:{i.line} imports {name} from {i.target}"
        for i in IMPORTS for name in i.names
        if name.startswith("_") and not name.startswith("__") and i.target != i.importer
    ]
    assert offenders == []


def test_no_import_inside_a_function_except_the_facades_lazy_ones():
    offenders = [f"{i.importer}:{i.line} imports {i.target} inside a function"
                 for i in IMPORTS if i.where == "function" and i.importer not in LAZY_ALLOWED]
    assert offenders == []


@pytest.mark.parametrize("module", ["adapters_mgr.cli.main", "adapters_mgr"])
def test_catalog_only_entry_points_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
