"""A background step repeated at a fixed interval, shared by the controller's metrics and autoscale loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(interval_s: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Forever: wait `interval_s`, then run `step`; a failed step is logged as `what` failed and the loop goes
    on (one bad scrape or decision must not end the loop). Ends only when cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception:  # noqa: BLE001 - logged; the next step tries again
            log.warning("%s failed", what, exc_info=True)
