"""Driving a guest through its serial console: run commands, wait for lines in its log.

This talks to QEMU's console socket directly, so it works without qlinkd (tests, the demo);
QEMU serves one client at a time, so it waits while someone is attached with `qlinkctl
console`.

- `GuestConsole`: one client of a node's console socket. QEMU's serial port writes byte by
  byte and stalls the guest while a connected client does not read, so a reader task drains
  the socket for as long as the console is open; commands run between unique markers.
- `wait_ready`: follows the nodes' console logs (inotify, with a one-second re-read as a
  safety net) until each prints its `qlink-ready name=NODE` line after a given offset.
- `parse_lldp_neighbors`: `lldpcli show neighbors -f keyvalue` as {port: (system, port id)}.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from asyncinotify import Inotify, Mask

from qlink.errors import VmError

READY_RE = re.compile(rb"qlink-ready name=(\S+)")
TRANSCRIPT_TAIL = 3000


class ConsoleError(VmError):
    """A console did not answer, closed, or a command failed; carries what was seen."""


class GuestConsole:
    """A connection to one node's console socket, read continuously until closed."""

    def __init__(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self._changed = asyncio.Event()
        self._eof = False
        self._drain_task = asyncio.get_running_loop().create_task(
            self._drain(), name=f"console:{name}"
        )

    @classmethod
    async def connect(cls, name: str, socket_path: Path, timeout: float = 60.0) -> GuestConsole:
        """Connect, then wait until the shell answers and make the terminal wide."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
        except OSError as error:
            raise ConsoleError(f"{name}: cannot connect to {socket_path}: {error}") from error
        console = cls(name, reader, writer)
        try:
            await console._sync(max(1.0, deadline - loop.time()))
        except BaseException:
            await console.close()
            raise
        return console

    async def __aenter__(self) -> GuestConsole:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _drain(self) -> None:
        while True:
            data = await self._reader.read(65536)
            if not data:
                self._eof = True
                self._changed.set()
                return
            self._buffer += data
            self._changed.set()

    async def close(self) -> None:
        """Hang up; the guest's shell stays, and QEMU accepts the next client."""
        self._drain_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain_task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    def transcript(self, tail: int = TRANSCRIPT_TAIL) -> str:
        """The end of what the console showed since we connected, for failure messages."""
        text = bytes(self._buffer[-tail:]).decode(errors="replace").replace("\r", "")
        return f"\n--- console of {self.name} (last {tail} bytes) ---\n{text}\n---"

    async def _expect(
        self, pattern: re.Pattern[bytes], start: int, timeout: float
    ) -> re.Match[bytes]:
        """The first match of `pattern` in what arrived from `start` on, within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    found = pattern.search(self._buffer, start)
                    if found is not None:
                        return found
                    if self._eof:
                        raise ConsoleError(f"{self.name}: the console closed" + self.transcript())
                    await self._changed.wait()
        except TimeoutError:
            raise ConsoleError(
                f"{self.name}: no {pattern.pattern!r} within {timeout:g} s" + self.transcript()
            ) from None

    async def _send(self, line: str) -> int:
        """Type a line; returns where in the buffer its answer starts."""
        start = len(self._buffer)
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()
        return start

    async def type_line(self, line: str) -> None:
        """Type a line and wait for nothing (`reboot -f` never answers)."""
        await self._send(line)

    async def run_rc(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command; returns its exit status and its output (without the echo).

        The terminal echoes what we type, so the end marker is typed split (`"@@M""K…"`):
        only the shell's own output holds it in one piece.
        """
        tag = uuid.uuid4().hex[:12]
        echoed_end = f'"@@M""K{tag} rc=$?@@"'
        start = await self._send(f"{command}; echo {echoed_end}")
        marker = await self._expect(
            re.compile(rb"@@MK" + tag.encode() + rb" rc=(\d+)@@"), start, timeout
        )
        answer = bytes(self._buffer[start : marker.start()]).decode(errors="replace")
        # Line editing may echo the line more than once (it redraws it): the output starts
        # on the line after the last echo.
        _, found, output = answer.rpartition(echoed_end)
        if found:
            output = output.partition("\n")[2]
        return int(marker.group(1)), output.replace("\r", "")

    async def run(self, command: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run a shell command and return its output; by default a non-zero status fails."""
        status, output = await self.run_rc(command, timeout)
        if check and status != 0:
            raise ConsoleError(
                f"{self.name}: `{command}` exited with {status}:\n{output}" + self.transcript()
            )
        return output

    async def _sync(self, timeout: float) -> None:
        """Until the shell answers (it may still be starting, or respawning)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                # a wide terminal: line editing never wraps the echoed input
                await self.run("stty cols 1000 rows 50", timeout=min(5.0, timeout))
                return
            except ConsoleError:
                if self._eof or loop.time() >= deadline:
                    raise


async def open_consoles(
    sockets: Mapping[str, Path], timeout: float = 60.0
) -> dict[str, GuestConsole]:
    """Connect to several consoles at once; on any failure none is left open."""
    results = await asyncio.gather(
        *(GuestConsole.connect(name, path, timeout) for name, path in sockets.items()),
        return_exceptions=True,
    )
    consoles = {c.name: c for c in results if isinstance(c, GuestConsole)}
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_consoles(consoles)
        raise failures[0]
    return consoles


async def close_consoles(consoles: Mapping[str, GuestConsole]) -> None:
    await asyncio.gather(*(console.close() for console in consoles.values()))


# --- ready lines in console logs ---------------------------------------------------------


@dataclass
class _FollowedLog:
    name: str
    path: Path
    offset: int
    pending: bytes = b""
    seen_at: float | None = None
    read_to: int = field(init=False)

    def __post_init__(self) -> None:
        self.read_to = self.offset

    def read_new(self) -> None:
        """Read what was appended; note when the node's ready line shows up."""
        if self.seen_at is not None:
            return
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.read_to)
                data = handle.read()
        except FileNotFoundError:
            return
        self.read_to += len(data)
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            found = READY_RE.search(line)
            if found is None:
                continue
            if found.group(1).decode(errors="replace") != self.name:
                raise ConsoleError(f"{self.path}: a ready line for another node: {line!r}")
            self.seen_at = time.monotonic()
            return

    def tail(self) -> str:
        try:
            data = self.path.read_bytes()[-1500:]
        except OSError as error:
            return f"\n--- {self.path}: {error}"
        return f"\n--- {self.path} (tail) ---\n" + data.decode(errors="replace")


async def wait_ready(
    logs: Mapping[str, Path], offsets: Mapping[str, int] | None = None, timeout: float = 300.0
) -> dict[str, float]:
    """Wait until every node printed `qlink-ready name=NODE` in its console log after its
    offset (0 when not given); returns when each was seen (`time.monotonic()`).

    The logs are followed through inotify, so a line is noticed as it is written; a re-read
    every second covers a directory that did not exist yet when the wait began.
    """
    followed = [
        _FollowedLog(name, path, (offsets or {}).get(name, 0)) for name, path in logs.items()
    ]
    watched: set[Path] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with Inotify() as inotify:
        while True:
            for log in followed:
                directory = log.path.parent
                if directory not in watched and directory.is_dir():
                    inotify.add_watch(directory, Mask.MODIFY | Mask.CREATE | Mask.MOVED_TO)
                    watched.add(directory)
                log.read_new()
            pending = [log for log in followed if log.seen_at is None]
            if not pending:
                return {log.name: log.seen_at for log in followed if log.seen_at is not None}
            left = deadline - loop.time()
            if left <= 0:
                raise ConsoleError(
                    f"no ready line from {[log.name for log in pending]} within {timeout:g} s"
                    + "".join(log.tail() for log in pending)
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, left)):
                    await inotify.get()


def log_sizes(logs: Mapping[str, Path]) -> dict[str, int]:
    """Where each log ends now: the offset after which a new ready line is awaited."""
    return {name: path.stat().st_size if path.exists() else 0 for name, path in logs.items()}


# --- LLDP --------------------------------------------------------------------------------

_PORT_ID_KINDS = ("ifname", "local", "mac")


def parse_lldp_neighbors(text: str) -> dict[str, tuple[str, str]]:
    """`lldpcli show neighbors -f keyvalue` as {local port: (system name, port id)}.

    Lines look like `lldp.swp51.chassis.name=spine1` and `lldp.swp51.port.ifname=swp1`; a
    local port name may itself hold dots (`swp1.100`), so keys are matched by their ends.
    Ports whose neighbour lacks a system name or a port id are left out.
    """
    names: dict[str, str] = {}
    port_ids: dict[str, dict[str, str]] = {}
    for raw in text.splitlines():
        key, sep, value = raw.strip().partition("=")
        if not sep or not key.startswith("lldp."):
            continue
        key = key.removeprefix("lldp.")
        if key.endswith(".chassis.name"):
            names[key.removesuffix(".chassis.name")] = value
            continue
        for kind in _PORT_ID_KINDS:
            if key.endswith(f".port.{kind}"):
                port_ids.setdefault(key.removesuffix(f".port.{kind}"), {})[kind] = value
    neighbors = {}
    for port, name in names.items():
        ids = port_ids.get(port, {})
        port_id = next((ids[kind] for kind in _PORT_ID_KINDS if kind in ids), None)
        if port_id is not None:
            neighbors[port] = (name, port_id)
    return neighbors


async def lldp_neighbors(console: GuestConsole) -> dict[str, tuple[str, str]]:
    return parse_lldp_neighbors(await console.run("lldpcli show neighbors -f keyvalue"))
