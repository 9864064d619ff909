"""What every `expertray` subcommand shares: one error wrapper (one line on stderr, exit code 2) and progress
lines on stderr for long operations.

Expected failures are: expertray's own errors (local, or raised inside an actor and re-raised by Ray), files
that cannot be read (OSError, ConnectionError included), and a controller that died or stopped answering.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import typer

from expertray.errors import ExpertRayError

EXIT_USAGE = 2
DEAD_CONTROLLER_HINT = ("the expertray controller died or does not answer; `expertray down` then `expertray up` "
                        "restarts the cluster")


def one_line(exc: BaseException) -> str:
    """The message of the original error (not Ray's remote-traceback wrapper), on one line."""
    cause = getattr(exc, "cause", None) or exc
    text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return text or type(cause).__name__


def _ray_failure(exc: BaseException) -> str | None:
    """A message for Ray's own errors that mean 'the cluster is not there' (None for anything else)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None:
        return None
    if isinstance(exc, ray_exceptions.RayActorError | ray_exceptions.GetTimeoutError):
        return f"{DEAD_CONTROLLER_HINT} ({type(exc).__name__})"
    return None


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn expected failures into `error: <one line>` on stderr and exit code 2."""
    try:
        yield
    except (ExpertRayError, OSError) as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as exc:
        message = _ray_failure(exc)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`cli_errors` as a decorator for a whole command."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cli_errors():
            return fn(*args, **kwargs)
    return wrapper


def say(message: str) -> None:
    """A progress line on stderr (stdout stays machine-readable)."""
    typer.echo(message, err=True)


@contextmanager
def progress(what: str, every_s: float = 5.0) -> Iterator[None]:
    """Say `what…` now, `still <what> (N s)` every `every_s` while the block runs, and the time it took."""
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(every_s):
            say(f"  still {what} ({time.monotonic() - start:.0f} s)")

    say(f"{what}...")
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    say(f"{what}: done in {time.monotonic() - start:.1f} s")
