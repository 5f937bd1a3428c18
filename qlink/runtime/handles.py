"""What the supervisor drives: a QEMU process, its QMP connection, and the runtime that makes
them. Protocols, so the state machine and the daemon are tested with fakes; `VmRuntime` is
the product's only implementation."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from qlink.errors import VmError
from qlink.plan.lab import NodePlan
from qlink.runtime import process as real_process
from qlink.runtime.hold import StartHold
from qlink.runtime.links import LinkSocket
from qlink.runtime.priority import StartPriorities
from qlink.runtime.process import AdoptVerdict, ExitStatus, ProcessIdentity, StopStep, StopTimeouts
from qlink.runtime.qmp import QmpSession


class ProcessHandle(Protocol):
    """What the supervisor needs of a QEMU process (`runtime.process.QemuProcess`)."""

    @property
    def identity(self) -> ProcessIdentity: ...
    @property
    def pid(self) -> int: ...
    @property
    def exited(self) -> bool: ...
    async def wait(self) -> ExitStatus: ...
    def send_signal(self, signum: signal.Signals) -> None: ...
    def stopped(self) -> bool:
        """Whether the process is stopped by a signal (SIGSTOP), not merely idle."""
        ...


class MonitorHandle(Protocol):
    """What the supervisor needs of a QMP connection (`runtime.qmp.QmpSession`)."""

    @property
    def connected(self) -> bool: ...
    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> Any: ...
    def listen(self, names: Iterable[str] = ...) -> AbstractContextManager[AsyncIterator[Any]]: ...
    async def unplug(self, device_id: str, timeout: float) -> None: ...
    async def pass_fd(self, fd: int, name: str) -> None: ...
    async def close(self) -> None: ...


class Runtime(Protocol):
    """The runtime operations a supervisor drives."""

    async def launch(
        self, argv: list[str], plan: NodePlan, timeout: float, qmp_name: str
    ) -> tuple[ProcessHandle, MonitorHandle]: ...
    def adopt(self, identity: ProcessIdentity) -> tuple[AdoptVerdict, ProcessHandle | None]: ...
    async def connect(self, name: str, plan: NodePlan, timeout: float) -> MonitorHandle: ...
    async def stop(
        self,
        process: ProcessHandle,
        qmp: MonitorHandle | None,
        timeouts: StopTimeouts,
        graceful: bool,
    ) -> StopStep: ...


CORES = os.cpu_count() or 1


class VmRuntime:
    """The real runtime: QEMU processes and QMP sessions (`runtime.process`, `runtime.qmp`)."""

    def __init__(
        self, watcher: real_process.CreationWatcher | None = None, vm_nice: int = 0
    ) -> None:
        self._watcher = watcher
        # Which starting QEMUs keep qlinkd's priority, and when they drop (`runtime.priority`).
        self._priorities = StartPriorities(vm_nice, CORES)
        # When a started QEMU's CPUs run (`runtime.hold`).
        self._hold = StartHold()

    async def launch(
        self, argv: list[str], plan: NodePlan, timeout: float, qmp_name: str
    ) -> tuple[ProcessHandle, MonitorHandle]:
        # The sockets the argv's `-netdev dgram,local.str=N` expect, one per data NIC.
        links = [LinkSocket.of(nic) for nic in plan.nics]
        with self._priorities.starting() as priority, self._hold.starting() as start:
            return await real_process.launch(
                argv, plan.paths, timeout, qmp_name, self._watcher, links=links,
                priority=priority, held=start if plan.held else None,
            )  # fmt: skip

    def adopt(self, identity: ProcessIdentity) -> tuple[AdoptVerdict, ProcessHandle | None]:
        return real_process.adopt(identity)

    async def connect(self, name: str, plan: NodePlan, timeout: float) -> MonitorHandle:
        qmp = await QmpSession.connect(name, plan.paths.qmp_socket, timeout)
        if plan.held:
            try:
                await real_process.run_if_never_run(qmp)
            except VmError:
                await qmp.close()
                raise
        return qmp

    async def stop(
        self,
        process: ProcessHandle,
        qmp: MonitorHandle | None,
        timeouts: StopTimeouts,
        graceful: bool,
    ) -> StopStep:
        assert isinstance(process, real_process.QemuProcess)
        assert qmp is None or isinstance(qmp, QmpSession)
        return await real_process.stop(process, qmp, timeouts, graceful)
