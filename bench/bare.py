"""The bare launcher: the physical limit qlink is measured against.

It starts the very argv `qlinkctl plan FILE -o json` prints, all at once, and waits for each
QEMU's QMP greeting; nothing else (no port checks, no state files, no supervision).

The greeting is the limit issue 16 sets, but it does not show that QEMU started: QEMU 7.2 sends
it from the monitor's I/O thread as soon as a client connects, while its main thread is still
building the machine (a QEMU whose `-device` is invalid greets, then exits). `answered=True`
waits instead until each QEMU answered its first command (`qmp_capabilities`, which the main
loop runs): the earliest moment any launcher can know QEMU is up, and what qlink waits for
before a node counts as running. The benchmark reports qlink against both. The argv
names each NIC's socket by descriptor number, so it opens those sockets as qlink does (bound,
connected to the peer, placed at the planned number: `qlink.runtime.links`) and closes its
copies once QEMU has them.

It runs inside the benchmark's own process (`launch`, `kill_and_wait`), with its imports done
and its event loop running before any clock starts: what is left is what no launcher can
avoid. (qlink's side is `qlinkctl`, a command, as users meet it: it pays its interpreter.)
QEMU runs in a session of its own, as under qlinkd; the benchmark kills it by PID. A launch is
all or nothing: if one QEMU exits before it greets, every QEMU this launch started is killed
and `BareError` carries QEMU's output.

Readiness is an event, as in qlink: QEMU creates its chardev sockets in command-line order and
the plan puts QMP before the console, so a refused connect (the QMP socket is bound but not yet
listening) is retried at the next inotify event of that directory, which the console socket's
creation guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask

from qlink.errors import QlinkError
from qlink.runtime.links import (
    LinkSocket,
    check_descriptor_limit,
    highest_descriptor,
    open_link_sockets,
    placement_actions,
)

GREETING = b'{"QMP":'
CAPABILITIES = b'{"execute": "qmp_capabilities"}\n'
ANSWER = b'{"return":'
LOG_TAIL_BYTES = 2000


class BareError(Exception):
    """A QEMU did not come up; the message carries its output."""


@dataclass(frozen=True, slots=True)
class BareNode:
    """What the launcher needs of one node of a plan document."""

    name: str
    argv: tuple[str, ...]
    qmp_socket: Path
    console_socket: Path
    qemu_log: Path
    console_log: Path
    links: tuple[LinkSocket, ...]

    @classmethod
    def from_plan(cls, name: str, document: dict[str, Any]) -> BareNode:
        paths = document["paths"]
        argv = list(document["argv"])
        if document["held"]:
            # qlinkd's start hold (`-S`, then `cont` once the QEMUs beside it started): by
            # hand, QEMU runs its guest from the start, which is the workload measured here.
            argv.remove("-S")
        return cls(
            name=name,
            argv=tuple(argv),
            qmp_socket=Path(paths["qmp_socket"]),
            console_socket=Path(paths["console_socket"]),
            qemu_log=Path(paths["qemu_log"]),
            console_log=Path(paths["console_log"]),
            links=tuple(
                LinkSocket.parse(nic["fd"], nic["local"], nic["remote"]) for nic in document["nics"]
            ),
        )


class Child:
    """One QEMU we spawned, its exit watched through a pidfd."""

    def __init__(self, node: BareNode, pid: int, wake: asyncio.Event) -> None:
        self.node = node
        self.pid = pid
        self.wake = wake
        self.log_start = 0
        self._pidfd = os.pidfd_open(pid)
        self.exited = False
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    @classmethod
    def spawn(cls, node: BareNode, wake: asyncio.Event) -> Child:
        # The same way qlink starts QEMU: its own session, output appended to its log.
        log_start = node.qemu_log.stat().st_size if node.qemu_log.exists() else 0
        log_fd = os.open(node.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open_link_sockets(node.links) as sockets:
                handover = [
                    (sock.fileno(), link.fd) for sock, link in zip(sockets, node.links, strict=True)
                ]
                actions = placement_actions([(null_fd, 0), (log_fd, 1), (log_fd, 2), *handover])
                check_descriptor_limit(highest_descriptor(actions))
                pid = os.posix_spawnp(
                    node.argv[0], list(node.argv), dict(os.environ), file_actions=actions,
                    setsid=True,
                )  # fmt: skip
        except QlinkError as error:
            raise BareError(f"{node.name}: {error}") from error
        finally:
            os.close(log_fd)
            os.close(null_fd)
        child = cls(node, pid, wake)
        child.log_start = log_start
        return child

    def _on_exit(self) -> None:
        self.close()
        self.exited = True
        self.wake.set()

    def close(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def kill(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def output(self) -> str:
        with contextlib.suppress(OSError), self.node.qemu_log.open("rb") as handle:
            size = self.node.qemu_log.stat().st_size
            handle.seek(max(self.log_start, size - LOG_TAIL_BYTES))
            return handle.read().decode(errors="replace")
        return ""

    async def greeted(self, answered: bool) -> None:
        """Until QEMU's QMP sends its greeting (`answered`: and then answers its first
        command); raises if QEMU exits first."""
        path = str(self.node.qmp_socket)
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.exited:
                raise BareError(f"{self.node.name}: QEMU exited during start-up:\n{self.output()}")
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except (FileNotFoundError, ConnectionRefusedError):
                continue  # bound, not yet listening: the console socket's creation follows
            try:
                line = await reader.readline()
                if not line.startswith(GREETING):
                    raise BareError(
                        f"{self.node.name}: no QMP greeting, got {line!r}:\n{self.output()}"
                    )
                if answered:
                    writer.write(CAPABILITIES)
                    try:
                        line = await reader.readline()
                    except ConnectionError:
                        line = b""  # QEMU hung up: it is exiting, its output says why
                    if not line.startswith(ANSWER):
                        raise BareError(
                            f"{self.node.name}: QEMU did not answer qmp_capabilities, got "
                            f"{line!r}:\n{self.output()}"
                        )
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            return


async def _dispatch(inotify: Inotify, wakes: dict[Path, asyncio.Event]) -> None:
    """Wake the node whose runtime directory saw a socket appear."""
    async for event in inotify:
        if event.path is not None and (wake := wakes.get(event.path.parent)) is not None:
            wake.set()


async def launch(
    nodes: Sequence[BareNode], timeout: float, *, answered: bool = False
) -> dict[str, int]:
    """Start every node at once; return their PIDs once all greeted (`answered`: answered
    their first command), or kill them all."""
    wakes: dict[Path, asyncio.Event] = {}
    children: list[Child] = []
    with Inotify() as inotify:
        for node in nodes:
            node.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
            node.console_log.parent.mkdir(parents=True, exist_ok=True)
            for stale in (node.qmp_socket, node.console_socket):
                stale.unlink(missing_ok=True)
            wakes[node.qmp_socket.parent] = asyncio.Event()
            inotify.add_watch(node.qmp_socket.parent, Mask.CREATE)
        try:
            for node in nodes:
                children.append(Child.spawn(node, wakes[node.qmp_socket.parent]))
            async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
                dispatcher = group.create_task(_dispatch(inotify, wakes))
                try:
                    async with asyncio.TaskGroup() as greetings:
                        for child in children:
                            greetings.create_task(child.greeted(answered))
                finally:
                    dispatcher.cancel()
        except BaseException:
            for child in children:
                child.kill()
            raise
        finally:
            for child in children:
                child.close()
    return {child.node.name: child.pid for child in children}


def _reap(pidfd: int) -> None:
    """The launcher runs in the benchmark's process, so its QEMUs are our children: reap one
    that exited (WNOHANG: it has), or it stays a zombie until the benchmark exits."""
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


async def kill_and_wait(pid: int, timeout: float) -> None:
    """SIGKILL a process that may not be our child, and wait until it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, exited)
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        async with asyncio.timeout(timeout):
            await gone
        _reap(pidfd)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def describe(error: BaseException) -> str:
    """Every message of an error or an exception group, one a line."""
    if isinstance(error, BaseExceptionGroup):
        return "\n".join(describe(inner) for inner in error.exceptions)
    return str(error) or type(error).__name__
