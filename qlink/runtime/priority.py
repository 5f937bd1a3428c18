"""Which starting QEMUs keep qlinkd's priority, and when each drops to `--vm-nice`.

A QEMU that starts alone (a restart) keeps qlinkd's own priority until its QMP answered: its
start-up is what the restart waits for, and at a lower weight it would wait behind every
guest already booting. Up to one per core may start that way at once. Once more are starting
(an `up`, a boot storm), every starting QEMU drops, the ones already spawned included: the
first ones of a storm would otherwise boot their guests at full weight while the rest are
still starting, and those starts are what the `up` waits for.

Measured on 2 cores (20 booting guests, 12-13 `up`s each way, alternating, twice): qlinkd's
`up` 805 and 864 ms with the first two kept high until answered, 674 and 720 ms with them
dropped as the third starts; 50 booting guests 2225 → 1889 ms. A restart while 20 guests boot
(alone, so kept high): 220-255 ms, against 764 ms when it started low.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

AUTOGROUP_SWITCH = Path("/proc/sys/kernel/sched_autogroup_enabled")
MAX_NICE = 19


def lower_priority(pid: int, nice: int) -> None:
    """QEMU `nice` steps below qlinkd, so that in a boot storm qlinkd gets the CPU first
    (its QMP round trips, its replies) and the guests take what is left, which is nearly all.

    Set on the process group (QEMU leads its own session), which reaches every thread QEMU
    has by then (Linux nice is per thread); the threads it makes later inherit it. With the
    scheduler's autogroups on (the default of most distributions' kernels), a task's nice
    weighs only against its own session, and QEMU's session is its own: there the session's
    autogroup gets the nice (all its threads, now and later). Best effort: a QEMU that died
    already is its supervisor's business, and a nice we may not set costs only the priority.
    """
    with contextlib.suppress(OSError):
        own = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PGRP, pid, min(own + nice, MAX_NICE))
    with contextlib.suppress(OSError):
        if AUTOGROUP_SWITCH.read_text().strip() == "1":
            Path(f"/proc/{pid}/autogroup").write_text(f"{min(nice, MAX_NICE)}\n")


class LaunchPriority(Protocol):
    """What a launch tells about its QEMU (`runtime.process.launch`)."""

    def spawned(self, pid: int) -> None: ...
    def answered(self, pid: int) -> None: ...


class StartPriorities:
    """The policy above, for every launch of one runtime. `nice` 0 turns it off."""

    def __init__(
        self, nice: int, cores: int, lower: Callable[[int, int], None] | None = None
    ) -> None:
        self._nice = nice
        self._cores = cores
        self._lower = lower if lower is not None else lower_priority
        self._starting = 0
        self._high: set[int] = set()
        """Spawned, not yet answered, still at qlinkd's priority."""

    @property
    def _storm(self) -> bool:
        return self._starting > self._cores

    @contextlib.contextmanager
    def starting(self) -> Iterator[LaunchPriority]:
        """For the length of one launch."""
        self._starting += 1
        if self._storm:
            for pid in sorted(self._high):
                self._drop(pid)
        slot = _Slot(self)
        try:
            yield slot
        finally:
            self._starting -= 1
            if slot.pid is not None:
                self._high.discard(slot.pid)  # a failed launch: its QEMU is gone

    def _spawned(self, pid: int) -> None:
        if self._storm:
            self._drop(pid)
        elif self._nice:
            self._high.add(pid)

    def _answered(self, pid: int) -> None:
        if pid in self._high:
            self._drop(pid)

    def _drop(self, pid: int) -> None:
        self._high.discard(pid)
        if self._nice:
            self._lower(pid, self._nice)


class _Slot:
    def __init__(self, priorities: StartPriorities) -> None:
        self._priorities = priorities
        self.pid: int | None = None

    def spawned(self, pid: int) -> None:
        self.pid = pid
        self._priorities._spawned(pid)

    def answered(self, pid: int) -> None:
        self._priorities._answered(pid)
