"""Name → policy-class registries. Config names select policies; unknown names fail listing the known ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from expertray.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of one kind of policy (routing, replica selection, placement, autoscale)."""

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

    def create(self, name: str, **params: Any) -> T:
        if name not in self._entries:
            raise ConfigError(f"{self.kind} policy {name!r} is unknown (known: {', '.join(sorted(self._entries))})")
        try:
            return self._entries[name](**params)
        except TypeError as exc:
            raise ConfigError(f"{self.kind} policy {name!r}: bad parameters ({exc})") from exc

    def names(self) -> list[str]:
        return sorted(self._entries)
