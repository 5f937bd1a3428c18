"""Readiness from the serial console: follow the console log QEMU writes and say when a line
matches the node's `ready.console` pattern.

The log, not the console socket: QEMU serves the socket to one client at a time (the console
hub's, when someone watches), while it writes every byte to the log file whatever happens.
Lines are matched one by one, at most `MAX_LINE` characters each, and an unterminated last line
too (a login prompt ends without a newline). Each match has a deadline (`regex`'s timeout), so
a pattern that backtracks forever only makes its node never ready, never stalls the daemon.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import regex
import structlog
from asyncinotify import Inotify, Mask

log = structlog.get_logger(__name__)

MAX_LINE = 4096
CHUNK = 1 << 20
MATCH_TIMEOUT = 0.05
READ_GAP = 0.1
"""At most this often a log is read while output flows. QEMU writes a console log a byte at a
time (the UART sends one), and qlinkd, above the guests' priority, would wake for nearly every
byte: until 20 booting guests were all ready, it took 1.6 s of CPU from them (0.8 s with the
gap). Bytes that arrive within the gap are read together; a match is seen at most this much
later."""


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class ConsoleReadiness:
    """Where the search stands in one node's console log."""

    def __init__(self, path: Path, pattern: str, offset: int) -> None:
        self.path = path
        self._pattern = regex.compile(pattern)
        self.offset = offset
        self._partial = ""

    def restart_at_end(self) -> None:
        """Only what the guest prints from now on counts (a reboot, a new QEMU)."""
        self.offset = log_size(self.path)
        self._partial = ""

    def close(self) -> None:
        """Nothing to let go of: each wait opens and closes its own watch."""

    async def matched(self) -> str:
        """Wait until a line matches; returns it. Cancel to stop."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # where QEMU will write it
        with Inotify() as inotify:
            # Watches first, then the first read: an append in between is not missed.
            inotify.add_watch(self.path.parent, Mask.CREATE | Mask.MOVED_TO)
            watched = False
            while True:
                if not watched and self.path.exists():
                    inotify.add_watch(self.path, Mask.MODIFY)
                    watched = True
                line = self._read_new()
                if line is not None:
                    return line
                await inotify.get()
                # Not a poll: the wait above is for output; this one gathers what follows it.
                # Meanwhile the kernel folds repeated MODIFY events of the log into one.
                await asyncio.sleep(READ_GAP)

    def _read_new(self) -> str | None:
        while True:
            try:
                with open(self.path, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    if size < self.offset:  # a log replaced or truncated: start over
                        self.offset, self._partial = 0, ""
                    data = os.pread(handle.fileno(), CHUNK, self.offset)
            except FileNotFoundError:
                return None
            if not data:
                return self._search_partial()
            self.offset += len(data)
            found = self._search(data.decode("utf-8", errors="replace"))
            if found is not None:
                return found

    def _search(self, text: str) -> str | None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()[-MAX_LINE:]
        for line in lines:
            if self._matches(line[-MAX_LINE:]):
                return line.strip()
        return None

    def _search_partial(self) -> str | None:
        """The unterminated last line (a prompt); once matched it is used up, so the newline
        that may follow it does not make the same line match twice."""
        if not self._partial or not self._matches(self._partial):
            return None
        line, self._partial = self._partial.strip(), ""
        return line

    def _matches(self, line: str) -> bool:
        try:
            return self._pattern.search(line.rstrip("\r"), timeout=MATCH_TIMEOUT) is not None
        except TimeoutError:
            log.warning("ready_pattern_too_slow", pattern=self._pattern.pattern, line=line[:200])
            return False
