"""`qlinkctl logs NODE`: the node's console log and QEMU's own stdout/stderr (`qemu.log`), and
with `follow=1` what is appended, waking on inotify."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from aiohttp import web
from asyncinotify import Inotify, Mask

from qlink.api.consoles import CONSOLES, _daemon, _flag
from qlink.errors import Conflict, Invalid

LOG_CHUNK = 1 << 20


def _read_at(path: Path, offset: int, size: int) -> tuple[bytes, int]:
    """Up to `size` bytes at `offset`, and the file's size now (-1: no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b"", -1
    try:
        length = os.fstat(fd).st_size
        return (os.pread(fd, size, offset) if offset < length else b""), length
    finally:
        os.close(fd)


def _tail_offset(path: Path, lines: int) -> int:
    """Where the last `lines` lines of the file start (0 for a shorter file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        end = os.fstat(fd).st_size
        if lines == 0:
            return end
        position, newlines = end, 0
        while position > 0:
            start = max(0, position - 8192)
            block = os.pread(fd, position - start, start)
            # A final newline ends the last line; it does not start one more.
            scan_end = len(block) - 1 if position == end and block.endswith(b"\n") else len(block)
            index = scan_end
            while (index := block.rfind(b"\n", 0, index)) != -1:
                newlines += 1
                if newlines == lines:
                    return start + index + 1
            position = start
        return 0
    finally:
        os.close(fd)


class _LogCopier:
    """Copies what each file gained since the last call, tail(1)-style headers between files."""

    def __init__(
        self, response: web.StreamResponse, files: list[Path], offsets: dict[Path, int]
    ) -> None:
        self._response = response
        self._files = files
        self._offsets = offsets
        self._headers = len(files) > 1
        self._last: Path | None = None

    async def _write(self, path: Path, data: bytes) -> None:
        if self._headers and self._last != path:
            lead = b"\n" if self._last is not None else b""
            await self._response.write(lead + f"==> {path} <==\n".encode())
        self._last = path
        await self._response.write(data)

    async def copy_new(self, announce: bool = False) -> None:
        """Copy what each file gained; `announce` (the first copy) heads every file that
        exists, even an empty one, so the reader knows which files there are."""
        for path in self._files:
            if announce and self._headers and path.exists():
                await self._write(path, b"")
            while True:
                offset = self._offsets[path]
                data, size = await asyncio.to_thread(_read_at, path, offset, LOG_CHUNK)
                if 0 <= size < offset:
                    # Shorter than what was read: truncated or replaced; start over.
                    self._offsets[path] = 0
                    continue
                if not data:
                    break
                self._offsets[path] = offset + len(data)
                await self._write(path, data)

    async def follow(self, state_dir: Path) -> None:
        """Copy what is there, then what is appended as inotify reports it, until cancelled
        (the client hung up, or qlinkd is stopping)."""
        with Inotify() as inotify:
            # Watches first, then the first copy: an append in between is not missed.
            inotify.add_watch(state_dir, Mask.CREATE | Mask.MOVED_TO)
            for path in self._files:
                with contextlib.suppress(FileNotFoundError):
                    inotify.add_watch(path, Mask.MODIFY)
            await self.copy_new(announce=True)
            async for event in inotify:
                if event.name is not None and event.watch is not None:
                    created = event.watch.path / event.name
                    if created in self._files:
                        inotify.add_watch(created, Mask.MODIFY)
                await self.copy_new()


async def logs_route(request: web.Request) -> web.StreamResponse:
    """`GET /v1/nodes/{node}/logs[?follow=1&which=all|console|qemu&tail=LINES]`: the bytes of
    the node's console log and QEMU's log; with `follow`, then what they gain, until the
    client leaves or qlinkd stops."""
    consoles = request.app[CONSOLES]
    _, supervisor = _daemon(request).labs.find_node(request.match_info["node"])
    paths = supervisor.plan.paths
    which = request.query.get("which", "all")
    choices = {
        "all": [paths.console_log, paths.qemu_log],
        "console": [paths.console_log],
        "qemu": [paths.qemu_log],
    }
    if which not in choices:
        raise Invalid(f"which= is one of {', '.join(choices)}, not {which!r}")
    files = choices[which]
    tail = request.query.get("tail")
    if tail is not None and not tail.isdigit():
        raise Invalid(f"tail= is a number of lines, not {tail!r}")
    follow = _flag(request.query.get("follow"))
    if follow and not paths.state_dir.is_dir():
        raise Conflict(f"{supervisor.name} has never run: it has no logs yet")

    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    offsets = {
        path: (await asyncio.to_thread(_tail_offset, path, int(tail)) if tail else 0)
        for path in files
    }
    copier = _LogCopier(response, files, offsets)
    if not follow:
        await copier.copy_new(announce=True)
        await response.write_eof()
        return response
    loop = asyncio.get_running_loop()
    follower = loop.create_task(copier.follow(paths.state_dir), name=f"logs:{supervisor.name}")
    stopping = loop.create_task(consoles.stopping.wait(), name="logs:stopping")
    try:
        await asyncio.wait({follower, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if follower.done():
            follower.result()  # it ends only by failing; a hang-up cancels this handler
        follower.cancel()  # qlinkd is stopping: end the stream properly
        await asyncio.wait({follower})
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left while we wrote
    finally:
        consoles.retire(follower, stopping)
    return response
