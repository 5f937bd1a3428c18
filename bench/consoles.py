"""Real guests: when each node's console log shows the guest's `qlink-ready name=NODE` line.

QEMU writes the console log itself (`-chardev ...,logfile=`), whether or not anyone is attached,
so both qlink's VMs and the bare launcher's are watched the same way: inotify on each log's
directory, reading what was appended at every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from pathlib import Path

from asyncinotify import Inotify, Mask

READY_RE = re.compile(rb"qlink-ready name=(\S+)")


class ReadyWatch:
    """Watches console logs from `start()` on; `wait()` returns each node's time to ready.

    Each log is removed before the start (QEMU appends to it), so everything read is new.
    """

    def __init__(self, logs: Mapping[str, Path]) -> None:
        self.logs = dict(logs)
        self._buffers = {node: bytearray() for node in self.logs}
        self._scanned = dict.fromkeys(self.logs, 0)
        self._ready: dict[str, float] = {}
        self._inotify = Inotify()
        self._started = 0.0

    def start(self) -> None:
        for log in self.logs.values():
            log.parent.mkdir(parents=True, exist_ok=True)
            log.unlink(missing_ok=True)
            self._inotify.add_watch(log.parent, Mask.CREATE | Mask.MODIFY)
        self._started = time.perf_counter()

    def _read(self, node: str) -> None:
        buffer = self._buffers[node]
        with contextlib.suppress(FileNotFoundError), self.logs[node].open("rb") as handle:
            handle.seek(len(buffer))
            buffer += handle.read()
        if node in self._ready:
            return
        # Rescan a little before the end of the last scan: a line may arrive in pieces.
        start = max(0, self._scanned[node] - 200)
        self._scanned[node] = len(buffer)
        if any(
            match.group(1).decode(errors="replace") == node
            for match in READY_RE.finditer(buffer, start)
        ):
            self._ready[node] = time.perf_counter() - self._started

    async def wait(self, timeout: float) -> dict[str, float]:
        by_path = {log: node for node, log in self.logs.items()}
        try:
            async with asyncio.timeout(timeout):
                for node in self.logs:
                    self._read(node)
                while len(self._ready) < len(self.logs):
                    event = await anext(aiter(self._inotify))
                    if event.mask & Mask.Q_OVERFLOW:
                        # QEMU writes a console log a byte at a time, one event each: booting
                        # guests can overflow the queue (16384 events) while this process
                        # waits for the CPU. Events were lost, so every log is read again.
                        for node in self.logs:
                            self._read(node)
                    elif event.path is not None and (changed := by_path.get(event.path)):
                        self._read(changed)
        except TimeoutError:
            missing = sorted(set(self.logs) - set(self._ready))
            raise TimeoutError(f"no ready line within {timeout:g} s from {missing}") from None
        finally:
            self._inotify.close()
        return dict(self._ready)
