"""The import graph of the checkout's packages, read from the source with `ast` (nothing is imported).

Used by tests/conftest.py (which test modules need Ray or prometheus_client: those importing it, or a package
module that imports it when imported) and tests/unit/test_layering.py (layers, cycles, the Ray boundary).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each installed package lives in the checkout (actors/ and policies/ install as expertray.*)
SOURCES = {"expertray": ROOT / "expertray", "expertray.actors": ROOT / "actors",
           "expertray.policies": ROOT / "policies"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if package == "expertray" and rel[0] in ("actors", "policies"):
                continue  # a development symlink to ../actors or ../policies
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether module `name` is one of `prefixes` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _resolve(name: str) -> str | None:
    """The package module an imported name lives in (`from m import x`: m.x if a module, else m)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _marked_ray(node: ast.AST) -> bool:
    """Whether `node` is a function decorated `@pytest.mark.ray` (it carries its own mark)."""
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
        ast.unparse(d) in ("pytest.mark.ray", "mark.ray") for d in node.decorator_list)


def imported_names(source: str, top_level_only: bool = False) -> set[str]:
    """Every absolute name a source imports (`from m import x` gives m and m.x), at module level only or
    anywhere except inside functions marked `@pytest.mark.ray`."""
    tree = ast.parse(source)
    names: set[str] = set()
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif not top_level_only and not _marked_ray(node):
            pending.extend(ast.iter_child_nodes(node))
    return names


@functools.cache
def imports(module: str, top_level_only: bool = False) -> frozenset[str]:
    """The package modules `module` imports (anywhere in it, or at module level only)."""
    found = {_resolve(n) for n in imported_names(MODULES[module].read_text(), top_level_only)
             if n.startswith("expertray")}
    return frozenset(m for m in found if m and m != module)


def _package_chain(module: str) -> list[str]:
    """`module` and the packages above it, which Python imports first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


@functools.cache
def needs_at_import(package: str) -> frozenset[str]:
    """The package modules whose import imports `package` (e.g. "ray"): directly at module level, or through
    the module-level imports of other package modules (their parent packages included)."""
    direct = {m for m in MODULES if any(within(n, (package,)) for n in imported_names(MODULES[m].read_text(), True))}
    needing = set(direct)
    changed = True
    while changed:
        changed = False
        for m in MODULES:
            if m in needing:
                continue
            deps = {p for d in imports(m, top_level_only=True) for p in _package_chain(d)}
            if deps & needing:
                needing.add(m)
                changed = True
    return frozenset(needing)


def source_needs(source: str, package: str) -> bool:
    """Whether a test module's code needs `package` installed: it imports it, or a package module that imports
    it when imported, anywhere except in tests marked `@pytest.mark.ray` (those carry their own mark)."""
    needing = needs_at_import(package)
    for name in imported_names(source):
        if within(name, (package,)):
            return True
        module = _resolve(name) if name.startswith("expertray") else None
        if module and any(p in needing for p in _package_chain(module)):
            return True
    return False
