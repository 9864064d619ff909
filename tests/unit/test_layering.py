"""The package tree is the architecture: which layer may import which, no import cycles, and Ray only behind
the package boundary (actors/, api.py, serve/, cli/, tools/bench, tools/demo).

Layers, lowest first; a module may import its own layer and those below it, never one above:
  core      expertray.{config, errors, validation, registry, seams, metrics, data, layer, runtime, state, wire,
            models} — Ray-free math, state machines, state and formats
  policies  expertray.policies — plug-ins over the core
  actors    expertray.actors — thin Ray shells over the core and the policies
  surfaces  expertray.{api, client, serve, cli} — what users call
  tools     expertray.tools — benchmarks, simulator, traces, workload, demo; nothing in the serving path
            (core, policies, actors, api, serve) imports them; the CLI is their entry point
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from package_graph import MODULES, ROOT, imported_names, imports, needs_at_import, within

LAYERS = ("core", "policies", "actors", "surfaces", "tools")
SURFACES = ("expertray.api", "expertray.client", "expertray.serve", "expertray.cli")
# Ray may be imported here and nowhere else
RAY_SIDE = ("expertray.actors", "expertray.api", "expertray.serve", "expertray.cli", "expertray.tools")


def layer_of(module: str) -> str:
    if within(module, ("expertray.tools",)):
        return "tools"
    if within(module, SURFACES):
        return "surfaces"
    if within(module, ("expertray.actors",)):
        return "actors"
    if within(module, ("expertray.policies",)):
        return "policies"
    return "core"


def test_every_module_is_found_and_parsed() -> None:
    assert {"expertray.layer.route", "expertray.actors.router", "expertray.policies.routing"} <= set(MODULES)
    assert imports("expertray.layer.route") >= {"expertray.layer.gating", "expertray.layer.dispatch"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_its_own_layer_or_below(module: str) -> None:
    if module == "expertray":
        return  # the public surface: `expertray.launch` etc. resolve lazily to the surfaces
    mine = LAYERS.index(layer_of(module))
    above = sorted(m for m in imports(module) if LAYERS.index(layer_of(m)) > mine)
    if layer_of(module) == "surfaces" and module.startswith("expertray.cli"):
        above = [m for m in above if layer_of(m) != "tools"]  # the CLI is the tools' entry point
    assert not above, f"{module} ({layer_of(module)}) imports a higher layer: {above}"


def test_no_import_cycles() -> None:
    """Module-level imports form no cycle. A plug-in importing its own package's __init__ (where the registry
    lives, and which imports the plug-ins last to register them) is Python's registration idiom, not a cycle
    between concepts, so child → ancestor-package edges are left out."""
    graph = {m: {d for d in imports(m, top_level_only=True) if not m.startswith(d + ".")} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_ray_only_behind_the_boundary() -> None:
    """No module outside RAY_SIDE imports Ray, even lazily, and each imports in a fresh interpreter where
    `import ray` fails."""
    importing = sorted(m for m in MODULES if not within(m, RAY_SIDE)
                       and any(within(n, ("ray",)) for n in imported_names(MODULES[m].read_text())))
    assert not importing, f"modules outside {RAY_SIDE} import Ray: {importing}"
    assert needs_at_import("ray") >= {"expertray.actors.router", "expertray.api"}
    ray_free = sorted(m for m in MODULES if not within(m, RAY_SIDE))
    code = ("import importlib, sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'):\n"
            "            raise ImportError(f'{name} is blocked: this module must not need Ray')\n"
            "sys.meta_path.insert(0, Block())\n"
            "bad = []\n"
            f"for name in {ray_free!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as exc:\n"
            "        if 'must not need Ray' in str(exc):  # another missing optional package is not this test's\n"
            "            bad.append(f'{name}: {exc}')\n"
            "print('\\n'.join(bad))\n"
            "sys.exit(1 if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, f"modules that need Ray outside the boundary:\n{done.stdout}{done.stderr[-2000:]}"
