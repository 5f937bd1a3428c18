"""Serial consoles of running nodes, the daemon side of `qlinkctl console NODE`.

QEMU serves a VM's serial port on a unix socket (`-chardev socket,server=on,wait=off`) that
takes ONE client at a time, and writes everything the guest prints to `console.log` itself,
whether or not a client is attached. Two facts shape this module:

- Several operators may watch one node, so qlinkd is the socket's only client and fans the
  output out to viewers over WebSocket (binary frames both ways; text frames from qlinkd are
  notices: "QEMU exited", "output dropped").
- QEMU's serial port writes byte by byte and stalls the guest while a connected client does
  not read. So a hub, once connected, reads continuously, and never waits for a viewer: each
  viewer has a bounded outbox, and output that does not fit is dropped (and counted).

    Consoles (one per API app)
     └── ConsoleHub (one per node, while it has viewers)    HubState: IDLE, CONNECTING,
          ├── its task: wait until the node runs, connect,            CONNECTED, WAITING
          │   read and broadcast; again after QEMU is replaced
          ├── viewers' keystrokes: written to the socket as they come
          └── Outbox per viewer: bounded, never blocks the hub

The hub connects when the first viewer attaches and hangs up when the last one leaves, so
while nobody watches QEMU takes another client (a debugger, socat) and only its log file gets
the output. The terminal side is `qlink/cli/terminal.py`; logs are `qlink/api/logs.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web

from qlink.aio import first_of
from qlink.errors import Invalid
from qlink.states import SERVES_QMP

if TYPE_CHECKING:
    from qlink.daemon import Daemon
    from qlink.daemon.labs import LabRuntime
    from qlink.policy import VmStatus
    from qlink.supervisor import VmSupervisor

log = structlog.get_logger("qlinkd")

OUTBOX_LIMIT = 64 * 1024
"""Bytes of output a viewer may have unsent before further output is dropped for it: six
seconds of a real 115200-baud line, on top of the socket buffers (a few hundred KiB)."""
SETTLE_TIMEOUT = 5.0
"""How long a new viewer's handshake waits for the hub to connect to QEMU."""
EXIT_NOTICE_WAIT = 2.0
"""After QEMU closes the console, how long to let the supervisor notice that QEMU exited
before concluding that the same QEMU hung up on us, and reconnecting to it."""


def _running(status: VmStatus) -> bool:
    return status.state in SERVES_QMP


def _gone_or_replaced(pid: int | None) -> Callable[[VmStatus], bool]:
    return lambda status: not _running(status) or status.pid != pid


# --- the daemon side: one hub per watched node --------------------------------------------


class Outbox:
    """What one viewer has yet to receive: output (bytes) and notices (str), bounded in bytes.

    `put_output` never waits. When output does not fit, the outbox drops output until the
    viewer has caught up to half the limit, then tells it how much it lost, in place: one gap
    and one notice per stall, rather than a sprinkle of holes.
    """

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self._limit = limit
        self._items: deque[bytes | str] = deque()
        self._size = 0
        self._dropped = 0
        self._ready = asyncio.Event()
        self.closed: str | None = None
        """Why qlinkd ends this viewer's session; set once, the last thing it is told."""

    def put_output(self, data: bytes) -> None:
        room = self._limit // 2 if self._dropped else self._limit
        if self._size and self._size + len(data) > room:  # an empty outbox takes any chunk
            self._dropped += len(data)
            return
        if self._dropped:
            self._items.append(f"{self._dropped} bytes of output dropped: this viewer fell behind")
            self._dropped = 0
        self._items.append(data)
        self._size += len(data)
        self._ready.set()

    def notice(self, text: str) -> None:
        self._items.append(text)
        self._ready.set()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self._ready.set()

    async def take(self) -> list[bytes | str]:
        """Everything pending, consecutive output joined; [] once closed and drained."""
        while not self._items and self.closed is None:
            await self._ready.wait()
            self._ready.clear()
        items: list[bytes | str] = []
        for item in self._items:
            if isinstance(item, bytes) and items and isinstance(items[-1], bytes):
                items[-1] += item
            else:
                items.append(item)
        self._items.clear()
        self._size = 0
        return items


class HubState(enum.Enum):
    IDLE = "idle"  # no viewers: no connection, no task
    CONNECTING = "connecting"
    CONNECTED = "connected"  # the only state in which keystrokes reach QEMU
    WAITING = "waiting"  # the node does not run


class ConsoleHub:
    """The daemon's one connection to a node's console socket, shared by its viewers."""

    def __init__(self, runtime: LabRuntime, supervisor: VmSupervisor) -> None:
        self.name = f"{runtime.name}/{supervisor.name}"
        self.supervisor = supervisor
        # The supervisor retires when the node leaves the daemon (down, removed from the
        # file, qlinkd stopping): then the hub ends its viewers' sessions.
        self._retired = supervisor.retired
        self._viewers: set[Outbox] = set()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._settled = asyncio.Event()
        self._connections = 0
        self.state = HubState.IDLE
        self._log = log.bind(lab=runtime.name, node=supervisor.name)

    @property
    def finished(self) -> bool:
        """The node is gone: a new viewer needs a new hub (the lab may have come back)."""
        return self._retired.is_set()

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def _set_state(self, state: HubState) -> None:
        self.state = state
        if state in (HubState.CONNECTED, HubState.WAITING):
            self._settled.set()

    def attach(self) -> Outbox:
        outbox = Outbox()
        self._viewers.add(outbox)
        if self._task is None:
            # IDLE → CONNECTING: the first viewer brings the connection up.
            self._settled.clear()
            self._set_state(HubState.CONNECTING)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"console:{self.name}"
            )
        return outbox

    async def settled(self, timeout: float) -> None:
        """Until the hub is connected, or knows the node does not run (at most `timeout`):
        a viewer told it is attached can type at once, and nothing it types is lost."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._settled.wait()

    def detach(self, outbox: Outbox) -> asyncio.Task[None] | None:
        """The last viewer out hangs up, so QEMU takes a client again (say, a debugger);
        returns the hub's task, cancelled, for the caller to see it finish."""
        self._viewers.discard(outbox)
        if self._viewers or self._task is None:
            return None
        task, self._task = self._task, None
        # → IDLE. A viewer attaching from now on starts a new task, whose connection QEMU
        # accepts once this one has hung up. What was typed is flushed before the hang-up.
        self._set_state(HubState.IDLE)
        task.cancel()
        return task

    async def write(self, data: bytes) -> None:
        """A viewer's keystrokes, while connected; otherwise dropped, rather than typed into
        a guest that boots later."""
        writer = self._writer
        if self.state is not HubState.CONNECTED or writer is None:
            return
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            # QEMU reads input only as fast as the guest's UART takes it: typing waits.
            await writer.drain()

    def _tell(self, text: str) -> None:
        for outbox in self._viewers:
            outbox.notice(text)

    async def _run(self) -> None:
        while True:
            if not _running(self.supervisor.status):
                # → WAITING: nothing to connect to until the node runs.
                self._set_state(HubState.WAITING)
                self._tell(f"{self.name} is {self.supervisor.status.state.value}: "
                           "waiting for it to run")  # fmt: skip
            if not await self._until(_running):
                break
            pid = self.supervisor.status.pid
            await self._serve_connection(pid)
            # QEMU hung up: it exited (a stop, a restart, a crash) or closed on us. Let the
            # supervisor notice an exit before connecting again.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_NOTICE_WAIT):
                    if not await self._until(_gone_or_replaced(pid)):
                        break
        # The node left the daemon: end every viewer's session.
        self._set_state(HubState.WAITING)
        reason = f"qlinkd no longer runs {self.name} (lab down, node removed, or qlinkd stopping)"
        self._log.info("console_hub_finished")
        for outbox in self._viewers:
            outbox.close(reason)

    async def _until(self, predicate: Callable[[VmStatus], bool]) -> bool:
        """Wait until the node's status satisfies `predicate` (True), or the node is gone."""
        if self._retired.is_set():
            return False
        index, _ = await first_of(self.supervisor.wait_for(predicate), self._retired.wait())
        return index == 0

    async def _serve_connection(self, pid: int | None) -> None:
        path = self.supervisor.plan.paths.console_socket
        self._set_state(HubState.CONNECTING)
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as error:
            # QEMU exited between the supervisor's RUNNING and now: wait for the next one.
            self._log.info("console_connect_failed", path=str(path), error=str(error))
            return
        # CONNECTING → CONNECTED.
        self._writer = writer
        self._set_state(HubState.CONNECTED)
        self._log.info("console_connected", pid=pid, viewers=len(self._viewers))
        if self._connections:
            self._tell(f"{self.name} runs again (pid {pid}): console reconnected")
        self._connections += 1
        try:
            await self._broadcast_output(reader)
        finally:
            # CONNECTED → CONNECTING (or IDLE, when the last viewer left). close() sends
            # what viewers typed before it hangs up.
            self._writer = None
            if self.state is HubState.CONNECTED:
                self._set_state(HubState.CONNECTING)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._log.info("console_disconnected", pid=pid)
        self._tell(f"QEMU closed the console of {self.name} (it exited, or was replaced)")

    async def _broadcast_output(self, reader: asyncio.StreamReader) -> None:
        """Read for as long as QEMU sends; never wait for a viewer."""
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                return
            if not data:
                return
            for outbox in self._viewers:
                outbox.put_output(data)


class Consoles:
    """The hubs of one API app, and what its shutdown must end.

    The API cancels a handler whose client hangs up, at any await, its clean-up included; so
    handlers let go of their tasks here (`retire`): cancelled at once, finished in their own
    time, seen to the end at shutdown, and their failures logged.
    """

    def __init__(self) -> None:
        self._hubs: dict[str, ConsoleHub] = {}
        self._retiring: set[asyncio.Task[Any]] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self.stopping = asyncio.Event()

    def retire(self, *tasks: asyncio.Task[Any] | None) -> None:
        for task in tasks:
            if task is None:
                continue
            task.cancel()
            self._retiring.add(task)
            task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[Any]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("console_task_failed", task=task.get_name(), error=repr(task.exception()))

    @contextlib.contextmanager
    def viewer(
        self, runtime: LabRuntime, supervisor: VmSupervisor
    ) -> Iterator[tuple[ConsoleHub, Outbox]]:
        name = f"{runtime.name}/{supervisor.name}"
        hub = self._hubs.get(name)
        if hub is None or hub.finished or hub.supervisor is not supervisor:
            hub = self._hubs[name] = ConsoleHub(runtime, supervisor)
        outbox = hub.attach()
        try:
            yield hub, outbox
        finally:
            # No await here: this runs in handlers that a hang-up may cancel again.
            self.retire(hub.detach(outbox))
            if hub.viewers == 0 and self._hubs.get(name) is hub:
                del self._hubs[name]

    async def shutdown(self) -> None:
        """Close every viewer and follower, or aiohttp would wait for them to leave."""
        self.stopping.set()
        for ws in list(self.sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"qlinkd is stopping")
        if self._retiring:
            await asyncio.wait(self._retiring)


CONSOLES = web.AppKey("consoles", Consoles)
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON]


def _flag(value: str | None) -> bool:
    return value not in (None, "", "0", "false", "no")


async def _pump(ws: web.WebSocketResponse, outbox: Outbox) -> None:
    """Outbox → one viewer; waiting here (a slow viewer) holds up nobody else."""
    try:
        while items := await outbox.take():
            for item in items:
                if isinstance(item, bytes):
                    await ws.send_bytes(item)
                else:
                    await ws.send_str(item)
        if outbox.closed is not None:
            await ws.send_str(outbox.closed)
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
    except ConnectionResetError:
        return  # the viewer left; its reading side ends the session


async def console_route(request: web.Request) -> web.StreamResponse:
    """`GET /v1/nodes/{node}/console`, a WebSocket: binary frames are the console's bytes
    both ways; text frames from qlinkd are notices."""
    consoles = request.app[CONSOLES]
    # An unknown node is a plain JSON 404 before any upgrade: qlinkctl maps it to exit 2.
    runtime, supervisor = _daemon(request).labs.find_node(request.match_info["node"])
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    if not ws.can_prepare(request).ok:
        raise Invalid("the console is a WebSocket: use `qlinkctl console NODE`")
    with consoles.viewer(runtime, supervisor) as (hub, outbox):
        # Attached and connected before the handshake completes: what the guest prints from
        # the moment the client sees the upgrade reaches it, and its first keys reach QEMU.
        await hub.settled(SETTLE_TIMEOUT)
        # Said before the handshake completes: a client that sees itself attached can
        # rely on the daemon having said so.
        log.info("console_viewer_attached", node=hub.name, viewers=hub.viewers)
        daemon = _daemon(request)
        daemon.events.publish("console", lab=runtime.name, node=supervisor.name,
                              action="attached", viewers=hub.viewers)  # fmt: skip
        await ws.prepare(request)
        consoles.sockets.add(ws)
        pump = asyncio.get_running_loop().create_task(_pump(ws, outbox))
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    await hub.write(message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    await hub.write(message.data.encode())
        finally:
            consoles.sockets.discard(ws)
            consoles.retire(pump)
            log.info("console_viewer_detached", node=hub.name, viewers=hub.viewers - 1)
            daemon.events.publish("console", lab=runtime.name, node=supervisor.name,
                                  action="detached", viewers=hub.viewers - 1)  # fmt: skip
    return ws


def add_console_routes(app: web.Application, daemon: Daemon) -> None:
    """Register `console` on the control API's app, and the hubs' shutdown."""
    consoles = Consoles()
    app[CONSOLES] = consoles
    app[DAEMON] = daemon

    async def on_shutdown(_: web.Application) -> None:
        await consoles.shutdown()

    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/v1/nodes/{node:.+}/console", console_route)
