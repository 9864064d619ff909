"""A pytest plugin (`-p block_imports`, with scripts/ on PYTHONPATH) that makes packages look uninstalled.

`make gpu-check` uses it on a machine that has Ray to prove the Ray-free selection (`-m "not ray"`)
neither needs nor imports Ray: EXPERTRAY_BLOCK_IMPORTS lists top-level package names (comma separated,
default "ray"); importing one of them raises ModuleNotFoundError, as on the GPU check machine."""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder

BLOCKED = tuple(n for n in os.environ.get("EXPERTRAY_BLOCK_IMPORTS", "ray").split(",") if n)


class _Blocker(MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by block_imports)", name=fullname)
        return None


loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
if loaded:
    raise RuntimeError(f"block_imports: {loaded[:3]} already imported before the plugin loaded")
sys.meta_path.insert(0, _Blocker())


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if leaked:
        raise RuntimeError(f"block_imports: {leaked[:3]} imported during the session")
