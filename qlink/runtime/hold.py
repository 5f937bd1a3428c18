"""When a starting QEMU's guest may run: once no QEMU starting beside it is still on its way.

Every node's QEMU starts with its CPUs stopped (`-S`, `plan/argv.py`), and its launch runs
them (QMP `cont`) once its QMP answered and every other start then in flight has answered or
failed. A QEMU that starts alone (a restart) runs at once. In an `up`, the guests run once the
last QEMU of the storm has started: no QEMU's start-up (most of a second of CPU under TCG)
waits behind guests already booting, and neither do qlinkd's QMP round trips. The guests
start a fraction of a second later than they would, and boot together.

Bounded: a start that hangs holds the others at most `HOLD_LIMIT` seconds, after which they
run without it.

Measured on 2 cores, 20 booting guests, runs alternating with and without the hold, 7 each:
`qlinkctl up` 593 ms (571-641) against 742 ms (626-953); until every guest was ready 51.6-55.2
s against 51.6-55.4 s, the median of the 7 paired differences +0.1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Protocol

HOLD_LIMIT = 5.0
"""Seconds a started QEMU waits for the starts beside it. A 20-VM `up` starts in half a second
on 2 cores; a 200-VM one in about 6 s, so its first QEMUs run a moment before its last."""


class HeldStart(Protocol):
    """What a launch whose QEMU holds its CPUs waits on (`runtime.process.launch`)."""

    async def released(self) -> None: ...


class StartHold:
    """Counts the starts in flight, for every launch of one runtime."""

    def __init__(self, limit: float = HOLD_LIMIT) -> None:
        self._limit = limit
        self._in_flight = 0
        self._none_in_flight = asyncio.Event()
        self._none_in_flight.set()

    @contextlib.contextmanager
    def starting(self) -> Iterator[HeldStart]:
        """For the length of one launch: a start in flight until it answered or failed."""
        self._in_flight += 1
        self._none_in_flight.clear()
        start = _Start(self)
        try:
            yield start
        finally:
            start.done()

    def _start_done(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            # Wakes every waiter, even if a new start clears it before they run.
            self._none_in_flight.set()

    async def _wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._limit):
                await self._none_in_flight.wait()


class _Start:
    def __init__(self, hold: StartHold) -> None:
        self._hold = hold
        self._counted = True

    def done(self) -> None:
        if self._counted:
            self._counted = False
            self._hold._start_done()

    async def released(self) -> None:
        """This QEMU answered: returns once no other start is in flight, or after the limit."""
        self.done()
        await self._hold._wait()
