"""The package's floors, checked on the source with `ast` (nothing here imports galvatron_fx).

Bottom to top: base (meta, plan, jsonio, progress); cost_models and search (pure arithmetic,
no torch.fx); runtime; unit_graph; passes; lowering (`lower()`); planning (pricing); compile
(the driver, imported only by the package root and the CLI); cli. RULES says what each floor
may not import. The layering is what keeps pricing and compiling on one lowering: planning
prices the program that `lowering.lower()` builds, compile runs that same program, and neither
reaches around it. Also checked: no import cycle, no private name taken from another module,
no galvatron_fx import deferred into a function outside the CLI (it would hide a cycle).
Imports are read anywhere in a file; a failure names file:line, the importer and the imported.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "galvatron_fx"
TORCH_FX = "torch.fx"


@dataclass(frozen=True)
class Import:
    where: str  # "galvatron_fx/passes/shard.py:12: galvatron_fx.passes.shard"
    importer: str  # the importing module
    target: str  # a galvatron_fx module, or torch.fx
    deferred: bool  # inside a function body
    names: tuple[str, ...] = ()  # the names taken by `from target import ...`


@functools.cache
def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _read(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    deferred = {id(n) for f in ast.walk(tree) if isinstance(f, functions) for n in ast.walk(f)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    for node in sorted(nodes, key=lambda n: n.lineno):
        if isinstance(node, ast.Import):
            targets: list[tuple[str, tuple[str, ...]]] = [(al.name, ()) for al in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..meta import y`
                base = f"{package.rsplit('.', node.level - 1)[0]}.{base}".rstrip(".")
            subs = {al.name: f"{base}.{al.name}" for al in node.names}
            modules = {n for n, sub in subs.items() if sub in _modules() or sub == TORCH_FX}
            names = tuple(n for n in subs if n not in modules)
            targets = [(subs[n], ()) for n in modules] + ([(base, names)] if names else [])
        where = f"{path.relative_to(ROOT)}:{node.lineno}: {module}"
        for target, taken in targets:
            if target == TORCH_FX or target.startswith(TORCH_FX + "."):
                found.append(Import(where, module, TORCH_FX, id(node) in deferred))
            elif target == PKG or target.startswith(PKG + "."):
                found.append(Import(where, module, target, id(node) in deferred, taken))
    return found


@functools.cache
def imports() -> tuple[Import, ...]:
    return tuple(i for m, p in _modules().items() for i in _read(m, p))


def floor(module: str) -> str:
    """galvatron_fx.passes.shard -> passes, galvatron_fx.meta -> meta, galvatron_fx -> root."""
    if module == TORCH_FX:
        return TORCH_FX
    return module.split(".")[1] if "." in module else "root"


Floors = Callable[[str], bool]


def only(*floors: str) -> Floors:
    return lambda f: f in floors


def all_but(*floors: str) -> Floors:
    return lambda f: f not in floors


COMPILER = ("unit_graph", "passes", "lowering", "planning", "compile")
# rule -> (the floors it binds, the floors they may not import)
RULES: dict[str, tuple[Floors, Floors]] = {
    "arithmetic": (only("cost_models", "search"), only(*COMPILER, "runtime", TORCH_FX)),
    "runtime": (only("runtime"), only(*COMPILER, "search")),
    "compile": (all_but("root", "cli"), only("compile")),
    "passes": (only("passes"), only("planning", "lowering", "compile", "search", "cli")),
    "lowering": (only("lowering"), only("planning", "compile")),
    "planning": (only("planning"), only("compile", "cli")),
    "models": (only("models"), all_but("models", TORCH_FX)),
    "cli": (all_but("cli"), only("cli")),
}


def _report(bad: list[str]) -> None:
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


def _check(*rules: str) -> None:
    bad = []
    for rule in rules:
        binds, forbidden = RULES[rule]
        for i in imports():
            if binds(floor(i.importer)) and forbidden(floor(i.target)):
                bad.append(f"{i.where} imports {i.target} (rule {rule!r})")
    _report(bad)


def test_no_import_cycle() -> None:
    graph = nx.DiGraph()
    for i in imports():
        if i.target != TORCH_FX and not graph.has_edge(i.importer, i.target):
            graph.add_edge(i.importer, i.target, imp=i)
    cycles = list(nx.simple_cycles(graph))
    if cycles:  # the shortest, one import per line
        edges = nx.utils.pairwise(min(cycles, key=len), cyclic=True)
        lines = [f"{graph.edges[e]['imp'].where} imports {e[1]}" for e in edges]
        _report([f"{len(cycles)} import cycle(s), the shortest:", *lines])


def test_cost_models_and_search_are_pure_arithmetic() -> None:
    _check("arithmetic")


def test_runtime_imports_no_compiler() -> None:
    _check("runtime")


def test_only_the_package_root_and_cli_import_compile() -> None:
    _check("compile")


def test_passes_lowering_planning_stay_below_compile() -> None:
    _check("passes", "lowering", "planning")


def test_models_stand_alone_and_nothing_below_cli_imports_cli() -> None:
    _check("models", "cli")


def test_no_private_name_imported_from_another_module() -> None:
    bad = [
        f"{i.where} imports {name} from {i.target}"
        for i in imports()
        if i.target != i.importer
        for name in i.names
        if name.startswith("_") and not name.endswith("__")
    ]
    _report(bad)


def test_no_deferred_imports_outside_cli() -> None:
    # The CLI defers its imports to keep `--help` fast (torch is slow to import); below it, a
    # function-level import is a layering cycle hidden from the importer.
    bad = [
        f"{i.where} imports {i.target} inside a function"
        for i in imports()
        if i.deferred and i.target != TORCH_FX and floor(i.importer) != "cli"
    ]
    _report(bad)
