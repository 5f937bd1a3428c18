"""What a supervisor does while its VM runs, between two commands: wait for the process to
exit, a command to arrive, or QMP to stop answering, and record QMP events meanwhile.

Runs inside the VM's own task (it is the supervisor's, split out to keep each part small):
the watch ends on the first of those three and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from qlink.aio import first_of
from qlink.errors import VmError
from qlink.policy import Liveness
from qlink.runtime.handles import MonitorHandle, ProcessHandle
from qlink.runtime.process import ExitStatus

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Hung:
    reason: str


async def watch(
    process: ProcessHandle,
    qmp: MonitorHandle,
    next_command: Callable[[], Coroutine[Any, Any, C]],
    liveness: Liveness,
    on_event: Callable[[str, dict[str, object]], None],
    *,
    stopped: asyncio.Event,
) -> tuple[ExitStatus | None, C | None, Hung | None]:
    """Until the process exits, a command arrives, or QMP stops answering. Returns the exit
    status, the command and the hang, each None unless it happened; an exit and a command
    can come together, and then the caller must keep the command."""
    async with asyncio.TaskGroup() as group:
        exited = group.create_task(process.wait())
        commanded = group.create_task(next_command())
        hung = group.create_task(first_hang(qmp, liveness, stopped))
        recorder = group.create_task(record_events(qmp, on_event))
        done, _ = await asyncio.wait((exited, commanded, hung), return_when=asyncio.FIRST_COMPLETED)
        for task in (exited, commanded, hung, recorder):
            if task not in done:
                task.cancel()
    return (
        exited.result() if exited in done else None,
        commanded.result() if commanded in done else None,
        hung.result() if hung in done and exited not in done and commanded not in done else None,
    )


async def first_hang(qmp: MonitorHandle, liveness: Liveness, stopped: asyncio.Event) -> Hung:
    _, first = await first_of(heartbeat(qmp, liveness), stopped_seen(stopped))
    hung: Hung = first.result()
    return hung


async def record_events(
    qmp: MonitorHandle, on_event: Callable[[str, dict[str, object]], None]
) -> None:
    with qmp.listen() as listener:
        async for event in listener:
            on_event(event["event"], event.get("data", {}))


async def heartbeat(qmp: MonitorHandle, liveness: Liveness) -> Hung:
    """Returns once `misses` query-status in a row went unanswered."""
    log = structlog.get_logger(__name__)
    misses = 0
    while True:
        await asyncio.sleep(liveness.interval)
        try:
            await qmp.execute("query-status", timeout=liveness.timeout)
        except VmError as error:
            misses += 1
            log.warning("vm_qmp_unanswered", misses=misses, error=str(error))
            if misses >= liveness.misses:
                return Hung(str(error))
        else:
            misses = 0


async def stopped_seen(stopped: asyncio.Event) -> Hung:
    """Once the daemon's scan of /proc saw the process stopped (`daemon/stopscan.py`)."""
    await stopped.wait()
    return Hung("the QEMU process is stopped (SIGSTOP)")
