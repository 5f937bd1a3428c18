"""The terminal side of `qlinkctl console NODE`: aiohttp's WebSocket client over the control
socket, the terminal in raw mode (always restored), `Ctrl-]` to detach; with stdin not a
terminal it is a plain pipe, so scripts and tests can drive a console. Only this verb imports
it (aiohttp's client takes a second to import)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp

from qlink.cli.client import Client
from qlink.errors import ControlError, DaemonUnreachable

ESCAPE = b"\x1d"
"""Ctrl-]: detaches a viewer (as telnet and virsh console do); never sent to the guest."""
ESCAPE_NAME = "Ctrl-]"


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Every key goes to the guest (Ctrl-C included); the settings come back however we
    leave."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


STDIN_CHUNKS = 64
"""Chunks read from stdin ahead of the WebSocket; past that, stdin is left unread a while."""


class _StdinReader:
    """stdin's chunks as they arrive, read only when epoll says the descriptor is readable: a
    read after a stale wake-up would block the whole loop (stdin stays in blocking mode, as
    it is shared with the shell). Paused while STDIN_CHUNKS wait to be sent."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self.reading = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.chunks.put_nowait(data)
        if not data or self.chunks.qsize() >= STDIN_CHUNKS:
            self.pause()

    def resume(self) -> None:
        self._loop.add_reader(self._fd, self._on_readable)
        self.reading = True

    def pause(self) -> None:
        if self.reading:
            self._loop.remove_reader(self._fd)
            self.reading = False


async def _stdin_chunks(fd: int) -> AsyncIterator[bytes]:
    """What arrives on stdin, until its end; a terminal, a pipe or a plain file."""
    reader = _StdinReader(fd)
    try:
        reader.resume()
    except PermissionError:
        # epoll refuses plain files and /dev/null, whose reads never block anyway.
        while data := os.read(fd, 65536):
            yield data
            await asyncio.sleep(0)
        return
    try:
        while data := await reader.chunks.get():
            yield data
            if not reader.reading and reader.chunks.empty():
                reader.resume()
    finally:
        reader.pause()


async def _send_input(ws: aiohttp.ClientWebSocketResponse, fd: int) -> None:
    """stdin → the console, until the escape byte or the end of input."""
    async for data in _stdin_chunks(fd):
        before, escape, _ = data.partition(ESCAPE)
        if before:
            await ws.send_bytes(before)
        if escape:
            return


async def _show_output(ws: aiohttp.ClientWebSocketResponse, raw: bool) -> str:
    """The console → stdout, qlinkd's notices → stderr; returns why the session ended."""
    out = sys.stdout.buffer
    last_notice = "qlinkd closed the console"
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            out.write(message.data)
            out.flush()
        elif message.type == aiohttp.WSMsgType.TEXT:
            last_notice = message.data
            end = "\r\n" if raw else "\n"
            sys.stderr.write(f"{end if raw else ''}[qlinkd] {message.data}{end}")
            sys.stderr.flush()
        elif message.type == aiohttp.WSMsgType.ERROR:
            return f"the console connection failed: {ws.exception()}"
    return last_notice


async def _session(socket_path: Path, node: str, raw: bool) -> int:
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            ws = await session.ws_connect(
                f"http://qlink/v1/nodes/{quote(node)}/console", max_msg_size=1 << 20
            )
        except aiohttp.ClientConnectorError as error:
            cause = error.os_error
            if isinstance(cause, PermissionError):
                reason = "permission denied (are you in its group?)"
            else:
                reason = cause.strerror or str(cause)
            raise DaemonUnreachable(str(socket_path), reason) from error
        async with ws:
            how = f"{ESCAPE_NAME}" if raw else f"{ESCAPE_NAME} (0x1d) or end of input"
            with raw_terminal(sys.stdin.fileno()) if raw else contextlib.nullcontext():
                # After the switch to raw mode: once this line shows, every key goes through.
                sys.stderr.write(f"qlinkctl: attached to the console of {node}; "
                                 f"detach with {how}{chr(13) if raw else ''}\n")  # fmt: skip
                sys.stderr.flush()
                typing = asyncio.get_running_loop().create_task(_send_input(ws, sys.stdin.fileno()))
                showing = asyncio.get_running_loop().create_task(_show_output(ws, raw))
                try:
                    done, _ = await asyncio.wait(
                        {typing, showing}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for task in (typing, showing):
                        task.cancel()
                    await asyncio.wait({typing, showing})
                if typing in done:
                    typing.result()
                    end = "\r\n" if raw else "\n"
                    sys.stderr.write(f"{end if raw else ''}qlinkctl: detached from {node}{end}")
                    return 0
                reason = showing.result()
    print(f"qlinkctl: console of {node} closed: {reason}", file=sys.stderr)
    return 1


def attach_console(socket_path: Path, node: str) -> int:
    """`qlinkctl console NODE`: 0 when the operator detaches, 1 when qlinkd ends it."""
    raw = sys.stdin.isatty()
    try:
        return asyncio.run(_session(socket_path, node, raw))
    except aiohttp.WSServerHandshakeError as error:
        # The daemon refused the upgrade with a JSON error (an unknown node is a 404): ask
        # again without upgrading, to raise that error with its message and hint.
        Client(socket_path).get(f"/nodes/{quote(node)}/console")
        raise ControlError(f"the console of {node} refused: HTTP {error.status}", 500) from error
    except KeyboardInterrupt:
        return 0  # Ctrl-C off a terminal (in raw mode it goes to the guest): a detach
