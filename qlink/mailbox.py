"""The commands a VM's task serves, and the queue they wait in.

Callers put a `Command` in and await its `done` future; only the VM's task takes them out
and answers them. The mailbox guarantees the callers' side of "nothing waits forever": once
closed (the task ended), a new command is answered at once, and every command still waiting
is answered with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from qlink.plan.lab import NodePlan
    from qlink.runtime.handles import MonitorHandle

CommandName = Literal["start", "stop", "restart", "kill", "configure", "call"]
LifecycleCommand = Literal["start", "stop", "restart", "kill"]
VmOperation = Callable[["MonitorHandle", int], Awaitable[Any]]
"""QMP work run by the VM's own task: given its session and the QEMU's PID."""


@dataclass
class Command:
    name: CommandName
    graceful: bool = True
    operation: VmOperation | None = None
    configuration: tuple[NodePlan, list[str]] | None = None
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def answer(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(result)
        else:
            self.done.set_exception(error)


class Mailbox:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Command] = asyncio.Queue()
        # A command that arrived together with an exit: served next, before newer ones.
        self._held: Command | None = None
        self.serving: Command | None = None
        """The command being served: answered with the error should the task die of a bug."""
        self.closed: BaseException | None = None

    def put(self, command: Command) -> asyncio.Future[Any]:
        if self.closed is not None:
            command.answer(error=self.closed)
        else:
            self._queue.put_nowait(command)
        return command.done

    def hold(self, command: Command) -> None:
        self._held = command

    async def take(self) -> Command:
        if self._held is not None:
            command, self._held = self._held, None
            return command
        return await self._queue.get()

    def answer_in_flight(self, error: BaseException) -> None:
        """Answer the command being served and the held one (the task lost track of them)."""
        for command in (self.serving, self._held):
            if command is not None:
                command.answer(error=error)
        self.serving, self._held = None, None

    def close(self, error: BaseException) -> None:
        """No command will be served any more: answer all of them, now and later."""
        self.closed = error
        self.answer_in_flight(error)
        while not self._queue.empty():
            self._queue.get_nowait().answer(error=error)
