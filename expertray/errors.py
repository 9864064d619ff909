"""Exceptions raised by expertray. Each names the offending field, expert, actor or offset."""

from __future__ import annotations


class ExpertRayError(Exception):
    """Base class for every error expertray raises on purpose."""


class ConfigError(ExpertRayError, ValueError):
    """A configuration value is out of range or inconsistent; the message names the field."""


def require(ok: bool, name: str, msg: str, *, prefix: str = "") -> None:
    """Raise ConfigError("<prefix>.<name>: <msg>") unless `ok`: the one field check every config uses.

    A config class binds its prefix once: `need = functools.partial(require, prefix="workload")`.
    """
    if not ok:
        raise ConfigError(f"{prefix}.{name}: {msg}" if prefix else f"{name}: {msg}")


class InputError(ExpertRayError, ValueError):
    """A request's tensor is malformed: shape, dtype, non-finite values, empty or oversize."""


class OversizeError(InputError):
    """A request is larger than a configured limit (tokens or bytes)."""


class UnknownExpertError(ExpertRayError, KeyError):
    """A (layer, expert) pair or an actor id that the placement table does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown expert"


class TraceFormatError(ExpertRayError, ValueError):
    """A trace or snapshot file is malformed or truncated; the message names the byte offset."""


class ExpertUnavailableError(ExpertRayError, RuntimeError):
    """No live replica could serve a bucket of tokens; the request fails instead of losing rows."""


class TransportError(ExpertRayError, RuntimeError):
    """Moving a batch to or from the expert actors failed (an actor died, a collective broke).

    actors: the expert actor ids the transport found dead or unresponsive (empty when it could not tell);
    the router masks them at once and retries on their surviving replicas."""

    def __init__(self, message: str = "", actors: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(message)
        self.actors = tuple(actors)

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.actors)


class BackpressureError(ExpertRayError, RuntimeError):
    """The router queue is full; retry later."""


class RequestTimeoutError(ExpertRayError, TimeoutError):
    """A request got no answer within `request_timeout_s`; it was withdrawn (nothing was returned for it)."""


class RouterUnavailableError(ExpertRayError, RuntimeError):
    """No live router could take a request before its deadline (routers died and were not yet replaced)."""


class NoChangeError(ExpertRayError, ValueError):
    """A placement change would leave the table as it is; nothing was applied and the version is unchanged."""


class CheckpointError(ExpertRayError, ValueError):
    """A checkpoint directory cannot be served: unreadable, missing shard or tensor, wrong shape or dtype,
    unsupported architecture. The message names the file and the tensor."""
