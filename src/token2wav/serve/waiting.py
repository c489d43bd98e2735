"""Waiting with a time limit without losing a cancellation.

On Python before 3.12, ``asyncio.wait_for`` returns the inner result when the inner awaitable finishes in the
same loop iteration as the waiting task is cancelled: the cancellation is lost. The server cancels a stream's
tasks when its client leaves; a lost cancellation left the stream's worker waiting out its whole idle timeout
(10 s in the tests), holding the connection open and delaying shutdown by as long. These helpers wait through
``asyncio.wait``, which never swallows a cancellation, and cancel what they waited on when they leave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["wait_event", "within"]

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds; whether it was set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(0.0, timeout))
    finally:
        waiter.cancel()
    return bool(done)


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """``await awaitable``, cancelled after ``timeout`` seconds (``asyncio.TimeoutError``)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task})  # let it end before the caller goes on (a send must not outlive its timeout)
        raise asyncio.TimeoutError
    return task.result()
