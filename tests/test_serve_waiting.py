"""Waits with a time limit that never lose a cancellation (``serve/waiting.py``).

On Python before 3.12 ``asyncio.wait_for`` returns normally when its inner awaitable finishes in the same loop
iteration as the waiting task is cancelled. The server cancels a stream's tasks when the client leaves; a lost
cancellation kept the stream's worker waiting out its idle timeout. Each test below builds that race exactly:
the awaited thing completes, and the waiter is cancelled, before the waiter runs again.
"""

from __future__ import annotations

import asyncio

import pytest

from token2wav.serve.waiting import wait_event, within


def test_a_cancellation_that_lands_as_the_event_is_set_is_kept() -> None:
    async def scenario() -> None:
        event = asyncio.Event()
        task = asyncio.create_task(wait_event(event, 10.0))
        await asyncio.sleep(0)  # the task now waits on the event
        event.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_cancellation_that_lands_as_the_awaited_call_ends_is_kept() -> None:
    async def scenario() -> None:
        inner = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(within(inner, 10.0))
        await asyncio.sleep(0)
        inner.set_result("sent")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_results_and_timeouts() -> None:
    async def scenario() -> None:
        event = asyncio.Event()
        assert await wait_event(event, 0.01) is False  # not set in time
        event.set()
        assert await wait_event(event, 0.0) is True  # already set: no wait at all

        async def slow() -> str:
            await asyncio.sleep(10)
            return "late"

        started = asyncio.get_running_loop().time()
        with pytest.raises(asyncio.TimeoutError):
            await within(slow(), 0.05)
        assert asyncio.get_running_loop().time() - started < 1.0

        async def quick() -> str:
            return "done"

        assert await within(quick(), 1.0) == "done"
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert left == []  # nothing left running behind a timeout

    asyncio.run(scenario())
