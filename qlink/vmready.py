"""A VM's readiness, kept by its supervisor's task: ready once its guest says so (the node's
`ready:`), and not any more when it reboots, restarts or crashes.

    launch ──► searching ──line matches──► ready ──guest RESET──► searching
        (a new QEMU, an adoption, a reboot: only what the guest prints from then counts)

The follower is a sub-task of the VM's task while the VM runs (`following`), so the VM's
status has one writer still.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from qlink.plan.lab import NodePlan
from qlink.policy import VmStatus
from qlink.runtime.agent_ready import AgentError, AgentReadiness
from qlink.runtime.console_ready import ConsoleReadiness, log_size

ADOPTED_LOOKBACK = 1 << 20
"""How much of an adopted VM's console log is searched: its QEMU may have printed the ready
line before qlinkd restarted, and the lines of older boots are further back (mostly)."""


class ReadySource(Protocol):
    def restart_at_end(self) -> None: ...

    def close(self) -> None: ...

    async def matched(self) -> str: ...


class ReadyWatch:
    def __init__(
        self, plan: NodePlan, status: VmStatus, changed: Callable[[], None], log: Any
    ) -> None:
        self._plan = plan
        self._status = status
        self._changed = changed
        self._log = log
        self._search: ReadySource | None = None
        self._lost = asyncio.Event()

    def configure(self, plan: NodePlan) -> None:
        self._plan = plan

    def _start(self, offset: int) -> None:
        self._close()
        ready = self._plan.node.ready
        paths = self._plan.paths
        if ready is None:
            self._search = None
        elif ready.console is not None:
            self._search = ConsoleReadiness(paths.console_log, ready.console, offset)
        else:
            self._search = AgentReadiness(paths.agent_socket)
        self._status.ready_at = None

    def _close(self) -> None:
        if self._search is not None:
            self._search.close()

    def launching(self) -> None:
        """Before a launch: only the new QEMU's output counts."""
        self._start(log_size(self._plan.paths.console_log))

    def adopted(self) -> None:
        self._start(max(0, log_size(self._plan.paths.console_log) - ADOPTED_LOOKBACK))

    def gone(self) -> None:
        self._close()
        self._search = None
        self._status.ready_at = None

    def guest_reset(self) -> None:
        """The guest rebooted inside the same QEMU: not ready until it says so again."""
        if self._search is None:
            return
        self._search.restart_at_end()
        if self._status.ready_at is not None:
            self._status.ready_at = None
            self._log.info("vm_not_ready", why="guest reset")
            self._changed()
        self._lost.set()

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """While the VM runs: the follower, owned by the VM's task, ended on the way out."""
        if self._search is None:
            yield
            return
        task = asyncio.get_running_loop().create_task(self._follow(self._search))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait({task})

    async def _follow(self, search: ReadySource) -> None:
        while True:
            self._lost.clear()
            try:
                line = await search.matched()
            except (OSError, AgentError) as error:
                # Asked again at the guest's next reset, not on a timer.
                self._log.warning("vm_agent_unreachable", error=str(error))
                await self._lost.wait()
                continue
            self._status.ready_at = time.time()
            started = self._status.started_at or self._status.ready_at
            self._log.info("vm_ready", line=line[:200],
                           after=round(self._status.ready_at - started, 1))  # fmt: skip
            self._changed()
            await self._lost.wait()
