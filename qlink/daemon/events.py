"""What happens in the daemon, as a stream of JSON-able events (`GET /v1/events`).

    {"event": "node_state", "lab": …, "node": …, "state": …, "pid": …, …}
    {"event": "carrier",    "lab": …, "node": …, "interface": …, "up": …, "reason": …}
    {"event": "lab",        "lab": …, "action": "up" | "changed" | "down"}
    {"event": "link_admin", "lab": …, "link": …, "admin": "up" | "down"}
    {"event": "impair",     "lab": …, "link": …, "a": …, "b": …, "source": "file" | "live",
                            "impair": {"a_to_b": {"delay": "20ms", …} | None, "b_to_a": …} | None}
    {"event": "impair_error", "why": …, "error": …}   (a pass nobody waited for failed)

Publishing never waits: each subscriber has a bounded queue, and one that falls that far
behind is told so (`{"event": "lagged"}`) and dropped, rather than slowing the daemon or
growing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

Event = dict[str, Any]

SUBSCRIBER_BACKLOG = 10_000


class Subscription:
    def __init__(self, limit: int) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue(limit + 1)
        self._limit = limit
        self.lagged = False

    def offer(self, event: Event) -> bool:
        """Queue the event; False (and a last `lagged` event) once the backlog is full."""
        if self._queue.qsize() >= self._limit:
            self.lagged = True
            self._queue.put_nowait({"event": "lagged", "time": time.time()})
            return False
        self._queue.put_nowait(event)
        return True

    async def get(self) -> Event:
        return await self._queue.get()

    def get_nowait(self) -> Event | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None


class EventBus:
    def __init__(self, backlog: int = SUBSCRIBER_BACKLOG) -> None:
        self._subscribers: set[Subscription] = set()
        self._backlog = backlog
        self._watching: list[tuple[int, asyncio.Future[None]]] = []

    async def until_subscribers(self, count: int) -> None:
        """Until exactly `count` subscribers listen: a test knows its client is ready."""
        if len(self._subscribers) != count:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._watching.append((count, waiter))
            await waiter

    def _counted(self) -> None:
        for entry in list(self._watching):
            count, waiter = entry
            if len(self._subscribers) == count:
                if not waiter.done():
                    waiter.set_result(None)
                self._watching.remove(entry)

    def publish(self, kind: str, **fields: Any) -> None:
        event = {"event": kind, "time": round(time.time(), 3), **fields}
        for subscription in list(self._subscribers):
            if not subscription.offer(event):
                self._subscribers.discard(subscription)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        subscription = Subscription(self._backlog)
        self._subscribers.add(subscription)
        self._counted()
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
            self._counted()
