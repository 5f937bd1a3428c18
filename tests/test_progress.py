"""The progress stream of `up` and `down` (`daemon.core._progress`): the lab's events while
its nodes' commands run, then `done` with the failures."""

from __future__ import annotations

import asyncio
from typing import Any

from qlink.daemon.core import _progress
from qlink.daemon.events import Event, Subscription
from qlink.policy import VmStatus


async def _collect(stream: Any) -> list[Event]:
    return [event async for event in stream]


async def test_the_labs_events_then_done_with_every_failure() -> None:
    updates = Subscription(100)
    waiting: dict[str, asyncio.Future[VmStatus]] = {
        name: asyncio.get_running_loop().create_future() for name in ("a", "b", "c")
    }
    collecting = asyncio.ensure_future(_collect(_progress("lab1", waiting, updates)))
    updates.offer({"event": "state", "lab": "lab1", "node": "a"})
    updates.offer({"event": "state", "lab": "other", "node": "x"})
    await asyncio.sleep(0)
    waiting["a"].set_result(VmStatus())
    waiting["b"].set_exception(RuntimeError("QEMU exited with status 1"))
    updates.offer({"event": "state", "lab": "lab1", "node": "c"})
    waiting["c"].cancel()
    events = await asyncio.wait_for(collecting, 5)
    assert [event.get("node") for event in events[:-1]] == ["a", "c"]
    assert events[-1] == {
        "event": "done",
        "lab": "lab1",
        "failed": {"b": "QEMU exited with status 1", "c": "cancelled"},
    }


async def test_an_event_queued_with_the_last_answer_comes_before_done() -> None:
    updates = Subscription(100)
    waiting: dict[str, asyncio.Future[VmStatus]] = {"a": asyncio.get_running_loop().create_future()}
    collecting = asyncio.ensure_future(_collect(_progress("lab1", waiting, updates)))
    await asyncio.sleep(0)
    waiting["a"].set_result(VmStatus())
    updates.offer({"event": "state", "lab": "lab1", "node": "a", "state": "running"})
    events = await asyncio.wait_for(collecting, 5)
    assert [event["event"] for event in events] == ["state", "done"]
