"""The package's import rules, read from the source with ``ast``.

Layers, bottom to top (ARCHITECTURE.md): a module may import modules of its
own layer or of layers below it, never above; the import graph has no cycle;
no import hides inside a function; and no module reaches into another
module's underscore names (``from m import _x``, or ``obj._x`` where ``_x`` is
not defined by the accessing module itself: ``self``/``cls``/``super()`` may use
their own class's protected hooks, whatever base class declared them).
``qcow2py/__init__.py`` and ``__main__`` modules are the façade: they may import
any layer.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict
from typing import Dict, List, Set, Tuple

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qcow2py")

#: bottom to top; a module belongs to the first layer whose prefix it matches
LAYERS: List[Tuple[str, ...]] = [
    ("qcow2py.errors", "qcow2py.version", "qcow2py.lazyimport", "qcow2py.buffers",
     "qcow2py.pipes"),
    ("qcow2py.format",),
    ("qcow2py.native", "qcow2py._native"),
    ("qcow2py.io",),
    ("qcow2py.node", "qcow2py.fileobj"),
    ("qcow2py.image",),
    ("qcow2py.raw", "qcow2py.qcow2"),
    ("qcow2py.backing", "qcow2py.opener"),
    ("qcow2py.report",),
    ("qcow2py.jobs", "qcow2py.backup"),
    ("qcow2py.nbd",),
    ("qcow2py.cli",),
]
#: the package and its ``python -m`` entry points
FACADE = {"qcow2py", "qcow2py.__main__", "qcow2py.copy", "qcow2py.copy.__main__"}

#: underscore names another module may still use, with the reason; every entry
#: is a debt (none left: issue #11's check works on the file, not the driver).
ALLOWED_PRIVATE: Dict[str, Set[str]] = {}


def _modules() -> Dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                if rel.endswith(".__init__"):
                    rel = rel[: -len(".__init__")]
                out[rel] = path
    return out


MODULES = _modules()


def _trees() -> Dict[str, ast.Module]:
    out = {}
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            out[name] = ast.parse(f.read(), path)
    return out


TREES = _trees()


def _is_package(name: str) -> bool:
    return MODULES[name].endswith("__init__.py")


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not _is_package(mod):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(mod: str, node) -> List[Tuple[str, str]]:
    """(imported module, imported name or '') pairs of one import statement,
    restricted to qcow2py modules."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.startswith("qcow2py"):
                out.append((a.name, ""))
    else:
        base = _resolve(mod, node)
        if not base.startswith("qcow2py"):
            return out
        for a in node.names:
            sub = f"{base}.{a.name}"
            out.append((sub, "") if sub in MODULES else (base, a.name))
    return out


def _lazy_target(node) -> str:
    """The qcow2py module a ``lazy_module("qcow2py.x")`` call names (an import made on
    first use, held to the same rules as an import statement), or ''."""
    if not (isinstance(node, ast.Call) and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return ""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else \
        func.attr if isinstance(func, ast.Attribute) else ""
    target = node.args[0].value
    if name in ("lazy_module", "LazyModule") and target.startswith("qcow2py"):
        assert target in MODULES, f"lazy_module names no module: {target}"
        return target
    return ""


def _imports(mod: str) -> List[Tuple[str, str, int, bool]]:
    """(target, name, line, inside a function) of every qcow2py import in ``mod``."""
    out = []

    def walk(node, in_func):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t, n in _targets(mod, child):
                    out.append((t, n, child.lineno, in_func))
            lazy = _lazy_target(child)
            if lazy:
                out.append((lazy, "", child.lineno, in_func))
            walk(child, f)

    walk(TREES[mod], False)
    return out


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _layer(mod: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if mod == p or mod.startswith(p + "."):
                return i
    raise AssertionError(f"module {mod} is in no layer: add it to LAYERS")


def test_every_module_has_a_layer():
    for mod in MODULES:
        if mod not in FACADE:
            _layer(mod)


def test_no_function_level_imports():
    bad = [f"{m}:{line} imports {t}" for m in MODULES for t, _n, line, f in _imports(m) if f]
    assert not bad, "imports inside functions (move them up, or fix the layering):\n" + \
        "\n".join(bad)


def test_no_type_checking_imports():
    bad = [m for m, tree in TREES.items() if any(_is_type_checking(n) for n in ast.walk(tree))]
    assert not bad, f"TYPE_CHECKING imports hide cycles: {bad}"


def test_imports_point_down():
    bad = []
    for mod in MODULES:
        if mod in FACADE:
            continue
        for target, _n, line, _f in _imports(mod):
            if target in FACADE or target == "qcow2py":
                bad.append(f"{mod}:{line} imports the façade {target}")
                continue
            if _layer(target) > _layer(mod):
                bad.append(f"{mod}:{line} imports {target} from a higher layer")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = defaultdict(set)
    for mod in MODULES:
        for target, _n, _line, _f in _imports(mod):
            if target in MODULES and target != mod:
                graph[mod].add(target)
    # Tarjan's strongly connected components
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    cycles = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(MODULES):
        if v not in index:
            visit(v)
    # a package importing its own submodules is how packages re-export
    cycles = [c for c in cycles if not all(x.startswith(c[0]) for x in c)]
    assert not cycles, f"import cycles: {cycles}"


def _defined_private(tree: ast.Module) -> Set[str]:
    """Underscore names a module defines: functions, classes, assignments,
    attributes it sets on its own objects (``self._a = ...``), ``__slots__`` entries."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            for a in node.args.args + node.args.kwonlyargs if not isinstance(node, ast.ClassDef) \
                    else []:
                names.add(a.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del))
              and _own_object(node.value)):
            names.add(node.attr)        # set on another object, a name is not this module's
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)       # __slots__ entries, getattr names
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _own_object(expr) -> bool:
    if isinstance(expr, ast.Name) and expr.id in ("self", "cls"):
        return True
    return (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)
            and expr.func.id == "super")


def _private_accesses(mod: str) -> List[Tuple[str, int]]:
    tree = TREES[mod]
    own = _defined_private(tree)
    elsewhere = set()
    for other, t in TREES.items():
        if other != mod:
            elsewhere |= _defined_private(t)
    out = []
    for target, name, line, _f in _imports(mod):
        if name.startswith("_") and not name.startswith("__"):
            out.append((f"from {target} import {name}", line))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and not _own_object(node.value)
                and node.attr not in own and node.attr in elsewhere):
            out.append((f"{ast.unparse(node)}", node.lineno))
    return out


def test_no_reaching_into_other_modules_privates():
    bad = []
    for mod in MODULES:
        allowed = ALLOWED_PRIVATE.get(mod, set())
        for what, line in _private_accesses(mod):
            attr = what.rsplit(".", 1)[-1].rsplit(" ", 1)[-1]
            if attr not in allowed:
                bad.append(f"{mod}:{line}: {what}")
    assert not bad, "\n".join(bad)
