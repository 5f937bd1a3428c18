"""Fakes of the runtime a supervisor drives (`qlink.runtime.handles`): processes whose exit a
test triggers, monitors that answer, hang or refuse on demand, and a runtime that launches
them from a script; and tc, as the daemon's impairment keeper drives it. Used by the
supervisor's and the daemon's pure tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from qlink.errors import LaunchError, VmError
from qlink.plan.lab import NodePlan
from qlink.plan.qdisc import Shaped
from qlink.runtime.handles import MonitorHandle, ProcessHandle
from qlink.runtime.impair import TcError, TrafficControl
from qlink.runtime.process import AdoptVerdict, ExitStatus, ProcessIdentity, StopStep, StopTimeouts


class FakeClock:
    """Stands in for the `time` module inside `qlink.supervisor`: still until advanced."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        """The launch timeline's marks (`vm_launch_timeline`) read this clock too."""
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    """A QEMU process whose exit the test triggers. SIGTERM and SIGKILL end it, as they
    end a QEMU; every signal is recorded."""

    def __init__(self, identity: ProcessIdentity) -> None:
        self._identity = identity
        self._exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self.signals: list[signal.Signals] = []

    @property
    def identity(self) -> ProcessIdentity:
        return self._identity

    @property
    def pid(self) -> int:
        return self._identity.pid

    @property
    def exited(self) -> bool:
        return self._exit.done()

    def crash(self, returncode: int | None = 1) -> None:
        """End the process: 0 is a clean exit, negative a signal, None a non-child's exit."""
        if not self._exit.done():
            self._exit.set_result(ExitStatus(returncode))

    async def wait(self) -> ExitStatus:
        # Shielded, like QemuProcess.wait: a cancelled waiter must not cancel the exit.
        return await asyncio.shield(self._exit)

    def stopped(self) -> bool:
        return signal.SIGSTOP in self.signals and signal.SIGCONT not in self.signals

    def send_signal(self, signum: signal.Signals) -> None:
        self.signals.append(signum)
        if signum in (signal.SIGTERM, signal.SIGKILL):
            self.crash(-signum)


class FakeMonitor:
    """A QMP connection. `execute` answers at once, or, where `hang(index)` says so, lets
    its deadline pass and raises `VmError` as `QmpSession.execute` does. Injected events
    reach whoever listens; `drained()` returns once the listener has handled them all."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.closed = False
        self.listens = 0
        self.hang: Callable[[int], bool] = lambda index: False
        self.refuse: dict[str, BaseException] = {}
        """Commands that raise the given error (a QEMU's refusal, or a bug) instead."""
        self.arguments: list[dict[str, Any] | None] = []
        self.passed: dict[str, tuple[Any, Any]] = {}
        """Descriptors passed (`pass_fd`) by name: the socket's local and peer address."""
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._recorded = asyncio.Condition()

    @property
    def connected(self) -> bool:
        return not self.closed

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> Any:
        index = len(self.commands)
        self.commands.append(command)
        self.arguments.append(arguments)
        async with self._recorded:
            self._recorded.notify_all()
        if self.hang(index):
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.get_running_loop().create_future()  # no answer, ever
            except TimeoutError as error:
                raise VmError(f"QMP {command} got no answer within {timeout:g} s") from error
        if command in self.refuse:
            raise self.refuse[command]
        return {"status": "running", "running": True} if command == "query-status" else {}

    async def unplug(self, device_id: str, timeout: float) -> None:
        await self.execute("device_del", {"id": device_id}, timeout)

    async def pass_fd(self, fd: int, name: str) -> None:
        # A copy, as QEMU gets one: the caller closes its own once this returns.
        with socket.socket(fileno=os.dup(fd)) as passed:
            self.passed[name] = (passed.getsockname(), passed.getpeername())
        await self.execute("getfd", {"fdname": name})

    async def wait_commands(self, count: int) -> None:
        async with self._recorded:
            await self._recorded.wait_for(lambda: len(self.commands) >= count)

    @contextlib.contextmanager
    def listen(self, names: Iterable[str] = ()) -> Iterator[AsyncIterator[dict[str, Any]]]:
        self.listens += 1
        yield self._stream()

    async def _stream(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            event = await self._events.get()
            try:
                yield event
            finally:
                # The listener asks for the next event only once it has handled this one.
                self._events.task_done()

    def inject(self, name: str, **data: Any) -> None:
        self._events.put_nowait({"event": name, "data": data, "timestamp": {}})

    async def drained(self) -> None:
        await self._events.join()

    async def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class StopCall:
    process: ProcessHandle
    qmp: MonitorHandle | None
    graceful: bool


LaunchOutcome = LaunchError | int | None
"""None: QEMU comes up. A LaunchError: it is refused. An int: it comes up, but has already
exited with that return code by the time the supervisor watches it."""


class FakeRuntime:
    """Launches, adopts, connects and stops fakes, and records every call in order."""

    def __init__(self, script: Iterable[LaunchOutcome] = (), first_pid: int = 1000) -> None:
        self.script = list(script)
        self.calls: list[str] = []
        self.launches: list[list[str]] = []
        self.alive_at_launch: list[list[int]] = []
        self.processes: list[FakeProcess] = []
        self.monitors: list[FakeMonitor] = []
        self.stops: list[StopCall] = []
        self.gate = asyncio.Event()
        """Cleared, it holds every launch in STARTING until the test sets it."""
        self.gate.set()
        self.adoptable: tuple[AdoptVerdict, FakeProcess | None] = (AdoptVerdict.GONE, None)
        self.left_running: dict[int, FakeProcess] = {}
        """Processes an earlier daemon's runtime started, by PID, for `adopt` to find."""
        self.connect_error: VmError | None = None
        self.stop_error: VmError | None = None
        self._pids = itertools.count(first_pid)

    async def launch(
        self, argv: list[str], plan: NodePlan, timeout: float, qmp_name: str
    ) -> tuple[ProcessHandle, MonitorHandle]:
        self.calls.append("launch")
        self.launches.append(list(argv))
        adopted = self.adoptable[1]
        known = [*self.processes, *([adopted] if adopted is not None else [])]
        self.alive_at_launch.append([process.pid for process in known if not process.exited])
        await self.gate.wait()
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, LaunchError):
            raise outcome
        pid = next(self._pids)
        process = FakeProcess(ProcessIdentity(pid, float(pid), tuple(argv)))
        if outcome is not None:
            process.crash(outcome)
        monitor = FakeMonitor()
        self.processes.append(process)
        self.monitors.append(monitor)
        return process, monitor

    def adopt(self, identity: ProcessIdentity) -> tuple[AdoptVerdict, ProcessHandle | None]:
        self.calls.append("adopt")
        alive = self.left_running.get(identity.pid)
        if alive is not None and not alive.exited:
            return AdoptVerdict.ADOPTED, alive
        return self.adoptable

    async def connect(self, name: str, plan: NodePlan, timeout: float) -> MonitorHandle:
        self.calls.append("connect")
        if self.connect_error is not None:
            raise self.connect_error
        monitor = FakeMonitor()
        self.monitors.append(monitor)
        return monitor

    async def stop(
        self,
        process: ProcessHandle,
        qmp: MonitorHandle | None,
        timeouts: StopTimeouts,
        graceful: bool,
    ) -> StopStep:
        self.calls.append("stop")
        self.stops.append(StopCall(process, qmp, graceful))
        if self.stop_error is not None:
            raise self.stop_error
        assert isinstance(process, FakeProcess)
        if process.exited:
            return StopStep.ALREADY_GONE
        if qmp is None:
            process.crash(-signal.SIGKILL)
            return StopStep.SIGKILL
        process.crash(0)
        return StopStep.POWERDOWN if graceful else StopStep.QUIT


class FakeTrafficControl(TrafficControl):
    """Records what the daemon asks of tc (`apply(wanted, owned)`) and holds the wanted
    state as `lo` would; `refuse` makes the next applies fail as tc would."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[tuple[dict[int, Shaped], set[int]]] = []
        self.current: dict[int, Shaped] = {}
        self.refuse: TcError | None = None

    async def apply(self, wanted: Mapping[int, Shaped], owned: AbstractSet[int]) -> list[str]:
        self.applied.append((dict(wanted), set(owned)))
        if self.refuse is not None:
            raise self.refuse
        for port in owned:
            self.current.pop(port, None)
        self.current.update(wanted)
        return [f"port {port}" for port in sorted(wanted)]
