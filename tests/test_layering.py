"""The package layering of mambaclinix, read from the source: every ``mambaclinix/**/*.py`` is parsed with
``ast`` and its imports collected — top-level ones, lazy ones inside functions, and string imports
(``importlib.import_module("...")``, and the module names of lazy-export tables in files that call it);
relative imports are resolved. Nothing is imported, so an import that only runs on some code path (a
CUDA kernel, a CLI subcommand) counts as much as one at the top of a file.

Checked: which package may import which (``ALLOWED``), no cycle between modules, no cycle between
packages, and which third-party packages the low layers may import. A failure names the file, the line
and the forbidden edge.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mambaclinix"
SOURCE = ROOT / PACKAGE
TOP = PACKAGE  # the "package" of mambaclinix/__init__.py itself

_LOW = {"utils", "ops", "layers", "models", "losses", "metrics", "inference", "configs"}
_EVERYTHING = _LOW | {"data", "planning", "training", "deploy", "demo", TOP}

# Which of our packages (first component under mambaclinix/; a top-level module such as cli.py counts as
# a package of its own) each package may import. Imports inside a package are always allowed.
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "configs": set(),  # YAML files only
    "ops": {"utils"},
    "layers": {"ops", "utils"},
    "models": {"layers", "ops", "utils"},
    "losses": {"utils"},
    "metrics": {"utils"},
    "inference": {"utils"},
    "data": {"inference", "metrics", "utils"},
    # TOP: the planner writes the package's __version__ into the configs it generates; mambaclinix/__init__.py
    # imports only models, which planning may import anyway.
    "planning": {"data", "models", "layers", "ops", "inference", "utils", TOP},
    "training": {"data", "models", "layers", "ops", "losses", "metrics", "inference", "utils"},
    # ONNX export and onnxruntime inference of a network; the CLI and the model package build on it.
    "deploy": {"models", "layers", "ops", "inference", "utils"},
    "demo": _EVERYTHING - {"demo"},
    "cli": _EVERYTHING,
    TOP: {"models"},  # `import mambaclinix` stays as light as the network itself
}

# Third-party packages the low layers must not import at all (they are dependencies of the data and
# training layers and must not be pulled in by `import mambaclinix` or by a network).
HEAVY = {"lightning", "pytorch_lightning", "lightning_fabric", "torchio"}
LOW_LAYERS = {"ops", "layers", "models", "losses", "metrics", "inference", "utils"}
# Optional accelerators: in the low layers only inside ops, and only lazily (inside a function, or at
# the top of an ops module that every importer loads lazily, such as the numba kernel file).
OPTIONAL = {"mamba_ssm", "causal_conv1d", "selective_scan_cuda", "triton", "numba"}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. "mambaclinix.training.module"
    target: str  # imported module of ours, or a third-party top-level name
    file: str  # path relative to the repository
    line: int
    lazy: bool  # inside a function, or a string import
    ours: bool

    def __str__(self) -> str:
        how = " (lazy)" if self.lazy else ""
        return f"{self.file}:{self.line}: {self.source} -> {self.target}{how}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    return TOP if len(parts) == 1 else parts[1]


@functools.cache
def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return _files()[module].name == "__init__.py"


def _resolve(module: str, level: int, name: str | None) -> str:
    """Absolute name of a (possibly relative) ``from ... import`` base, seen from ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _closest_module(name: str) -> str:
    """The longest prefix of ``name`` that is one of our modules (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in _files():
        parts.pop()
    return ".".join(parts)


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, file: str) -> None:
        self.module, self.file = module, file
        self.depth = 0  # function nesting
        self.edges: list[tuple[str, int, bool]] = []  # (absolute name, line, lazy)
        self.strings: list[tuple[str, int]] = []
        self.calls_import_module = False

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.edges.append((alias.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, node.level, node.module)
        for alias in node.names:
            full = f"{base}.{alias.name}"
            # `from pkg import sub` imports the module pkg.sub if there is one, else a name of pkg
            target = full if _ours(full) and full in _files() else base
            self.edges.append((target, node.lineno, self.depth > 0))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__"):
            self.calls_import_module = True
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                target = node.args[0].value
                if target.startswith("."):
                    level = len(target) - len(target.lstrip("."))
                    target = _resolve(self.module, level, target.lstrip(".") or None)
                self.edges.append((target, node.lineno, True))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in _files() and node.value != self.module:
            self.strings.append((node.value, node.lineno))


@functools.cache
def collect() -> tuple[Edge, ...]:
    """Every import edge of every module, ours and third-party."""
    edges: list[Edge] = []
    for module, path in _files().items():
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        c = _Collector(module, rel)
        c.visit(tree)
        found = list(c.edges)
        if c.calls_import_module:  # lazy-export tables: {"Name": "mambaclinix.pkg.module"}
            found += [(name, line, True) for name, line in c.strings]
        for name, line, lazy in found:
            if _ours(name):
                target = _closest_module(name)
                edges.append(Edge(module, target, rel, line, lazy, True))
                # Importing a module of another package first runs that package's __init__.py.
                parts = target.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if not module.startswith(parent + ".") and module != parent and _is_package(parent):
                        edges.append(Edge(module, parent, rel, line, lazy, True))
            elif name:
                edges.append(Edge(module, name.split(".")[0], rel, line, lazy, False))
    return tuple(dict.fromkeys(edges))


def _ours_edges() -> list[Edge]:
    return [e for e in collect() if e.ours and e.source != e.target]


def _strongly_connected(nodes, successors) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(successors.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(successors.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _cycle_report(key) -> list[str]:
    """Cycles of the graph whose nodes are ``key(module)``; each reported with the edges that form it."""
    succ: dict[str, set[str]] = {}
    by_pair: dict[tuple[str, str], list[Edge]] = {}
    for e in _ours_edges():
        a, b = key(e.source), key(e.target)
        if a != b:
            succ.setdefault(a, set()).add(b)
            by_pair.setdefault((a, b), []).append(e)
    lines = []
    for component in _strongly_connected(sorted(succ), succ):
        members = set(component)
        inside = [e for (a, b), es in sorted(by_pair.items()) if a in members and b in members for e in es]
        lines.append(f"cycle between {', '.join(component)}:\n    " + "\n    ".join(map(str, inside)))
    return lines


# ------------------------------------------------------------------------------------------------ tests


def test_the_source_is_found_and_imports_are_seen():
    edges = {(e.source, e.target, e.lazy) for e in collect()}
    assert len(_files()) > 20
    # A top-level import, a lazy one and one through a lazy-export table, as the collector must see them.
    assert ("mambaclinix", "mambaclinix.models", False) in edges
    assert ("mambaclinix.ops.selective_scan", "mambaclinix.ops._scan_numba", True) in edges
    assert ("mambaclinix.data", "mambaclinix.data.datamodule", True) in edges
    assert ("mambaclinix.training.module", "lightning", False) in edges  # third-party, top level


def _closure(start: str, lazy: bool) -> set[str]:
    """Modules that importing ``start`` loads according to the collected edges (with lazy ones or not);
    importing a module first runs the ``__init__.py`` of each package above it."""
    succ: dict[str, set[str]] = {}
    for e in _ours_edges():
        if lazy or not e.lazy:
            succ.setdefault(e.source, set()).add(e.target)
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for m in [".".join(parts[:i]) for i in range(1, len(parts))] + [module]:
            if m not in seen:
                seen.add(m)
                todo.extend(succ.get(m, ()))
    return seen


@pytest.mark.parametrize("start", ["mambaclinix", "mambaclinix.data", "mambaclinix.planning"])
def test_collected_imports_match_what_python_loads(start):
    # An independent check of the collector: the modules Python really loads for `import start` are
    # exactly those its top-level imports reach.
    code = f"import sys, {start}; print(*sorted(m for m in sys.modules if m.split('.')[0] == 'mambaclinix'))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == _closure(start, lazy=False)


def test_relative_imports_are_resolved():
    assert _resolve("mambaclinix.data.datamodule", 1, "sampling") == "mambaclinix.data.sampling"
    assert _resolve("mambaclinix.data", 1, "sampling") == "mambaclinix.data.sampling"  # __init__.py
    assert _resolve("mambaclinix.data.datamodule", 2, "inference") == "mambaclinix.inference"
    assert _resolve("mambaclinix.data.datamodule", 1, None) == "mambaclinix.data"


def test_every_package_is_in_the_table():
    unknown = sorted({package_of(m) for m in _files()} - set(ALLOWED))
    assert not unknown, f"packages missing from ALLOWED in {__file__}: {unknown}"


def test_packages_import_only_the_layers_below_them():
    bad = []
    for e in _ours_edges():
        a, b = package_of(e.source), package_of(e.target)
        if a != b and b not in ALLOWED.get(a, set()):
            bad.append(f"{e}  [{a} may not import {b}]")
    assert not bad, "forbidden imports:\n  " + "\n  ".join(bad)


def test_no_import_cycle_between_modules():
    cycles = _cycle_report(lambda m: m)
    assert not cycles, "\n".join(cycles)


def test_no_import_cycle_between_packages():
    cycles = _cycle_report(package_of)
    assert not cycles, "\n".join(cycles)


def test_low_layers_import_no_heavy_third_party_package():
    bad = [
        f"{e}  [{package_of(e.source)} may not import {e.target}]"
        for e in collect()
        if not e.ours and package_of(e.source) in LOW_LAYERS and e.target in HEAVY
    ]
    assert not bad, "forbidden imports:\n  " + "\n  ".join(bad)


def test_optional_accelerators_only_lazily_inside_ops():
    # An ops module counts as lazily loaded when no module imports it at the top level.
    eager = {e.target for e in _ours_edges() if not e.lazy}
    bad = []
    for e in collect():
        package = package_of(e.source)
        if e.ours or e.target not in OPTIONAL or package not in LOW_LAYERS:
            continue
        if package != "ops":
            bad.append(f"{e}  [only ops may import {e.target}]")
        elif not e.lazy and (e.source in eager or _is_package(e.source)):
            bad.append(f"{e}  [{e.source} is imported eagerly, so {e.target} must be imported lazily]")
    assert not bad, "forbidden imports:\n  " + "\n  ".join(bad)
