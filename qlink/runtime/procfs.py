"""A process's identity and state, read from /proc: cheap enough for every launch, every
adoption and every liveness check."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from qlink.errors import HostError

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What launch and adoption need of /proc/PID/stat."""

    state: str
    """R, S, D, T, Z (a zombie), X (dead), ..."""
    start_ticks: int
    """Clock ticks from boot to the process's start (field 22): never changes while it runs."""
    boot_time: float

    @property
    def start_time(self) -> float:
        """Seconds since the epoch, as psutil's `create_time` computes it: records written by a
        qlinkd that used psutil still match."""
        return self.start_ticks / CLOCK_TICKS + self.boot_time


@functools.cache
def _boot_time() -> float:
    """When the kernel booted, in seconds since the epoch (`btime` in /proc/stat).

    Read once: it does not change, and /proc/stat (every CPU's and IRQ's counters) takes
    1-2 ms to produce on a busy host, once per launch otherwise."""
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise HostError("/proc/stat has no btime line")


def read_stat(pid: int) -> ProcStat:
    """The one source of a process's start time, for what `launch` records and what `adopt`
    checks. Raises FileNotFoundError or ProcessLookupError once the process is gone.

    Two small reads, on the event loop at every launch: psutil's `Process` reads and checks
    more than this needs."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        raw = stat.read()
    # The command name (field 2) is in parentheses and may hold spaces and parentheses
    # itself: the fields after it start after its last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(fields[0].decode(), int(fields[19]), _boot_time())


def read_cmdline(pid: int) -> tuple[str, ...]:
    """The process's argv, decoded the way Python decodes its own."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        raw = cmdline.read()
    if not raw:
        return ()  # a zombie, or a kernel thread
    return tuple(os.fsdecode(item) for item in raw.removesuffix(b"\0").split(b"\0"))
