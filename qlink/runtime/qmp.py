"""A thin, time-bounded layer over `qemu.qmp.QMPClient` for one VM's monitor socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, Runstate
from qemu.qmp.error import QMPError
from qemu.qmp.message import Message

from qlink.errors import QmpCommandError, VmError

# Every event the supervisor acts on; the rest (NIC_RX_FILTER_CHANGED, RTC_CHANGE ...) is noise.
WATCHED_EVENTS = ("SHUTDOWN", "RESET", "GUEST_PANICKED", "STOP", "RESUME", "POWERDOWN")


def _nothing(event: Any) -> bool:
    return False


class _Client(QMPClient):
    """The library's client, minus a cost: its message hooks pretty-print every message for a
    DEBUG log line (`json.dumps(indent=2)`, Python's slow encoder) even when nothing logs DEBUG:
    5-7 messages per launch, 3.7% of qlinkd's samples during an `up` of 50 (py-spy)."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg


class QmpSession:
    """One connected QMP client; every command has a deadline."""

    def __init__(self, name: str, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._client = _Client(name)
        # The client's default listener cannot be removed, and would queue (and keep in its
        # history) every event for the life of the VM; its public filter turns it off.
        self._client.events.event_filter = _nothing

    @classmethod
    async def connect(cls, name: str, socket_path: Path, timeout: float) -> QmpSession:
        session = cls(name, socket_path)
        try:
            async with asyncio.timeout(timeout):
                await session._client.connect(str(socket_path))
        except (ConnectError, TimeoutError) as error:
            raise VmError(f"QMP at {socket_path} did not answer: {error}") from error
        return session

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> Any:
        """Run one QMP command; a QEMU that does not answer in time is a `VmError`."""
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, arguments)
        except ExecuteError as error:
            raise QmpCommandError(command, error.error_class, str(error)) from error
        except TimeoutError as error:
            raise VmError(f"QMP {command} got no answer within {timeout:g} s") from error
        except (QMPError, OSError, EOFError) as error:
            raise VmError(f"QMP {command} failed: {type(error).__name__}: {error}") from error

    @contextlib.contextmanager
    def listen(self, names: Iterable[str] = WATCHED_EVENTS) -> Iterator[AsyncIterator[Any]]:
        """QMP events of these names while the block runs, as an async iterator."""
        listener = EventListener(names)
        with self._client.listen(listener):
            yield aiter(listener)

    async def unplug(self, device_id: str, timeout: float) -> None:
        """`device_del`, then wait until the guest let the device go (`DEVICE_DELETED`).

        PCI unplug asks the guest to eject the device (ACPI); one that ignores the request
        (no hotplug support) keeps it, which after `timeout` is a `VmError`.
        """
        with self.listen(["DEVICE_DELETED"]) as events:
            await self.execute("device_del", {"id": device_id})
            try:
                async with asyncio.timeout(timeout):
                    async for event in events:
                        if event["data"].get("device") == device_id:
                            return
            except TimeoutError as error:
                raise VmError(
                    f"the guest did not release {device_id} within {timeout:g} s "
                    "(does it support PCI hotplug?)"
                ) from error
        raise VmError(f"QMP closed before {device_id} was released")

    async def pass_fd(self, fd: int, name: str, timeout: float = 5.0) -> None:
        """Give QEMU a copy of descriptor `fd`, kept under `name` for a later command (such as
        `netdev_add` with `local.str=NAME`): SCM_RIGHTS on the monitor socket, then `getfd`,
        which takes the descriptor that came with it. The caller still owns `fd`."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as error:
            raise VmError(f"cannot pass descriptor {fd} to QEMU: {error}") from error
        await self.execute("getfd", {"fdname": name}, timeout)

    async def disconnected(self) -> None:
        """Return once the server hung up (QEMU exited, or closed the monitor)."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()

    async def close(self) -> None:
        """Disconnect; the EOF of a QEMU that already went away is expected, not an error."""
        if self._client.runstate == Runstate.IDLE:
            return
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
