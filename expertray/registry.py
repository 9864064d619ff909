"""Name → implementation registries (Ray's collective backend registry is the pattern).

A seam's implementations register themselves by name (`@REGISTRY.register("name")`); the config declares the
names it accepts, and the module that imports the last implementation calls `check` with them, so a registry
that drifts from its config fails at import (vLLM's EPLB policy registry asserts the same against its
Literal). Unknown names fail listing the known ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from expertray.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """The implementations of one seam (routing, replica selection, placement, autoscale, transport, gating)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} policy {name!r} registered twice")
            self._entries[name] = factory
            return factory
        return deco

    def unregister(self, name: str) -> None:
        """Forget `name` (tests that plug in a fake implementation clean up with this)."""
        self._entries.pop(name)

    def create(self, name: str, **params: Any) -> T:
        if name not in self._entries:
            raise ConfigError(f"{self.kind} policy {name!r} is unknown (known: {', '.join(sorted(self._entries))})")
        try:
            return self._entries[name](**params)
        except TypeError as exc:
            raise ConfigError(f"{self.kind} policy {name!r}: bad parameters ({exc})") from exc

    def names(self) -> list[str]:
        return sorted(self._entries)

    def check(self, declared: Iterable[str]) -> None:
        """Fail unless the registry holds exactly `declared`, the names its config field accepts."""
        declared = set(declared)
        if declared != set(self._entries):
            raise RuntimeError(f"{self.kind} registry and config disagree: registered but not declared "
                               f"{sorted(set(self._entries) - declared)}, declared but not registered "
                               f"{sorted(declared - set(self._entries))}")


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of `package` (its `__name__`, `__path__`): each implementation there registers
    itself, so adding one is adding its file."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{info.name}")
