"""Giving up on work whose HTTP caller has gone away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

POLL_SECONDS = 0.1  # cheap; a gone client must not hold its rows long
T = TypeVar("T")


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T | None:
    """Await, but give up (cancelling it) if the caller disconnects meanwhile; None then.

    Starlette cancels a streaming response's generator by itself; a plain handler keeps running
    after its caller left, so the API and the model server wrap their waits in this.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()  # a no-op once it is done
