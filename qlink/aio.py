"""asyncio helpers the daemon uses in more than one place."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_of(*awaitables: Awaitable[Any]) -> tuple[int, asyncio.Future[Any]]:
    """Wait until the first of `awaitables` finishes; cancel the others and wait for them to
    end. Returns the index of the one that finished and its future (whose result or error
    the caller reads). Futures passed in are not cancelled (only tasks made here are), so a
    caller may race an `asyncio.Event().wait()` against a future someone else owns."""
    futures = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    owned = [
        future for future, awaitable in zip(futures, awaitables, strict=True)
        if future is not awaitable
    ]  # fmt: skip
    try:
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        pending = [future for future in owned if not future.done()]
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.wait(pending)
    index = next(i for i, future in enumerate(futures) if future in done)
    return index, futures[index]
