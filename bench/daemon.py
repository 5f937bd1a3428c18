"""qlinkd for the benchmark: a subprocess on a short root, ready when it says READY=1.

Started the way systemd starts it (`Type=notify`): the benchmark binds NOTIFY_SOCKET and
waits for READY=1 as an event. Its JSON log goes to a file, which `LogFollower` reads as it
grows (inotify) to see events such as `vm_adopted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask

from bench.procs import BenchError, Completed, python_command, qlinkctl_command, run_timed
from qlink.plan.paths import Layout

LOG_TAIL = 3000
ERROR_LINE = re.compile(r"^[ |+-]*(\w+(?:Error|Exception)\b.*)$", re.MULTILINE)


class Qlinkd:
    """One `qlinkd --root ROOT --log-format json` process."""

    def __init__(self, root: Path, extra: Sequence[str] = ()) -> None:
        self.root = root
        self.extra = list(extra)
        self.log_path = root / f"qlinkd-{time.monotonic_ns()}.log"
        self._process: asyncio.subprocess.Process | None = None
        self._notify: socket.socket | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "qlinkd is not started"
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-LOG_TAIL:]
        return ""

    def death_cause(self) -> str:
        """The last exception qlinkd logged (its traceback goes to the log), or its status."""
        errors = ERROR_LINE.findall(self.log_tail())
        code = self._process.returncode if self._process is not None else None
        return errors[-1] if errors else f"exit status {code}"

    async def start(self, timeout: float = 60.0) -> float:
        """Start qlinkd and wait for READY=1; returns the seconds it took.

        The notify socket stays bound while qlinkd runs, as systemd's does: qlinkd also
        sends STOPPING=1 on its way out.
        """
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._notify = notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *python_command("qlink.qlinkd"), "--root", str(self.root),
                "--log-format", "json", *self.extra,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )  # fmt: skip

        async def ready() -> None:
            while True:
                message = (await loop.sock_recv(notify, 4096)).decode()
                if "READY=1" in message.split("\n"):
                    return

        try:
            async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
                readied = group.create_task(ready())
                exited = group.create_task(self._process.wait())
                await asyncio.wait((readied, exited), return_when=asyncio.FIRST_COMPLETED)
                readied.cancel()
                exited.cancel()
        except TimeoutError:
            await self.stop()
            raise BenchError(
                f"qlinkd sent no READY=1 in {timeout:g} s:\n{self.log_tail()}"
            ) from None
        if not self.alive:
            await self.stop()
            raise BenchError(f"qlinkd exited before READY=1:\n{self.log_tail()}")
        return time.perf_counter() - started

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL; qlinkd leaves its VMs running either way."""
        process = self._process
        try:
            if process is None or process.returncode is not None:
                return
            for signum in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await process.wait()
                    return
        finally:
            if self._notify is not None:
                self._notify.close()
                self._notify = None

    async def ctl(self, *argv: str, timeout: float = 900.0, check: bool = True) -> Completed:
        """Run `qlinkctl --root ROOT ARGV...` as an operator would, timed."""
        result = await run_timed([*qlinkctl_command(), "--root", str(self.root), *argv], timeout)
        return result.check() if check else result

    async def get_seconds(self, path: str, method: str = "GET") -> float:
        """One request on the control socket from this process: the daemon's share of a
        command, without the interpreter start-up and imports a `qlinkctl` pays."""
        started = time.perf_counter()
        control = Layout.under(self.root).control_socket
        reader, writer = await asyncio.open_unix_connection(str(control))
        try:
            length = "Content-Length: 0\r\n" if method == "POST" else ""
            request = (
                f"{method} /v1{path} HTTP/1.1\r\nHost: qlink\r\n{length}Connection: close\r\n\r\n"
            )
            writer.write(request.encode())
            await writer.drain()
            status_line = await reader.readline()
            await reader.read()  # the headers and body, until the daemon closes
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if b" 200 " not in status_line:
            raise BenchError(f"{method} {path}: {status_line!r}")
        return time.perf_counter() - started

    async def status(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads((await self.ctl("status", "-o", "json")).stdout)
        return rows


class LogFollower:
    """Reads a JSON-lines log as it grows; `wait_for` returns once enough lines match."""

    def __init__(self, path: Path, from_end: bool = False) -> None:
        """`from_end`: only lines written from now on count."""
        self.path = path
        self._offset = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""

    def _new_events(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset += len(chunk)
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            events = []
            for line in lines:
                with contextlib.suppress(json.JSONDecodeError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        events.append(event)
            return events
        return []

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], count: int, timeout: float
    ) -> list[dict[str, Any]]:
        matched: list[dict[str, Any]] = []
        with Inotify() as inotify:
            inotify.add_watch(self.path.parent, Mask.MODIFY | Mask.CREATE)
            async with asyncio.timeout(timeout):
                while True:
                    matched += [event for event in self._new_events() if predicate(event)]
                    if len(matched) >= count:
                        return matched
                    async for event in inotify:
                        if event.name is not None and str(event.name) == self.path.name:
                            break
