"""The repeated background step: waits first, survives a failing step, ends only when cancelled."""

from __future__ import annotations

import asyncio

from expertray.runtime.periodic import every


def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog) -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("scrape failed")

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(every(0.005, step, "metrics collection"))
        await asyncio.sleep(0)
        assert calls == []  # the first step waits one interval
        for _ in range(200):
            await asyncio.sleep(0.005)
            if len(calls) >= 3:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()

    asyncio.run(scenario())
    assert len(calls) >= 3 and "metrics collection failed" in caplog.text
