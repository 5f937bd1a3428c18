"""Processes the benchmark starts and measures: timed commands, /proc figures, QEMU sweeps.

Every command runs in a session of its own, so a Ctrl-C at the terminal reaches the benchmark
alone, and the benchmark's teardown (which needs qlinkd and qlinkctl) still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.bare import kill_and_wait
from qlink.runtime.ports import udp_port_in_use

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and shows the output."""


@dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    """Wall time from just before the spawn to the reaped exit."""

    def check(self) -> Completed:
        if self.returncode != 0:
            raise BenchError(
                f"{' '.join(self.argv)} exited {self.returncode}:\n{self.stdout}{self.stderr}"
            )
        return self


async def run_timed(argv: Sequence[str], timeout: float = 600.0) -> Completed:
    """Run a command to its end, timing it from spawn to exit."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    seconds = time.perf_counter() - started
    assert process.returncode is not None
    return Completed(
        tuple(argv), process.returncode, stdout.decode(errors="replace"),
        stderr.decode(errors="replace"), seconds,
    )  # fmt: skip


def python_command(module: str) -> list[str]:
    """`python -m module` with this interpreter (not a shim that would add its own start-up)."""
    return [sys.executable, "-m", module]


def qlinkctl_command() -> list[str]:
    """The `qlinkctl` an operator runs: the console script next to this interpreter."""
    script = Path(sys.executable).with_name("qlinkctl")
    return [str(script)] if script.is_file() else python_command("qlink.cli")


# --- /proc -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may hold spaces: split after the last one.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def memory_bytes(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


# --- ports and QEMU processes --------------------------------------------------------------


def busy_udp_ports(address: str, ports: Iterable[int]) -> list[int]:
    """Ports someone holds, probed as qlink does (a bind without SO_REUSEADDR)."""
    return [port for port in ports if udp_port_in_use(address, port)]


def qemu_under(root: Path) -> list[psutil.Process]:
    """Live QEMU processes whose command line names a path under `root`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmdline = process.info["cmdline"] or []
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue  # gone; PID 1 here reaps orphans only every couple of seconds
            if cmdline and "qemu-system" in cmdline[0] and any(str(root) in a for a in cmdline):
                found.append(process)
    return found


def runs_under(pid: int, root: Path) -> bool:
    """Whether PID is still a QEMU of ours (so a reused PID is never killed)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return bool(cmdline) and "qemu-system" in cmdline[0] and any(str(root) in a for a in cmdline)


async def kill_all(pids: Iterable[int], root: Path, timeout: float = 30.0) -> None:
    """SIGKILL each QEMU of ours by PID and wait until every one is gone."""
    mine = [pid for pid in pids if runs_under(pid, root)]
    async with asyncio.TaskGroup() as group:
        for pid in mine:
            group.create_task(kill_and_wait(pid, timeout))


def sweep_sync(root: Path) -> list[int]:
    """Last resort, outside any event loop: kill every QEMU left under `root`, by PID."""
    leftovers = qemu_under(root)
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(leftovers, timeout=30)
    return [process.pid for process in leftovers]
