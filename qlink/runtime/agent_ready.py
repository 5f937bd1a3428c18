"""`ready: {agent: true}`: the QEMU guest agent answers `guest-ping` on the node's channel.

QEMU reads nothing from the channel's socket until the guest opens its port, so a request
written while the guest boots waits in the socket and the agent reads it when it starts: the
answer itself is the event, and nothing is asked again on a timer. `guest-sync-delimited`
comes first, as the agent protocol prescribes, because the channel may hold the unread tail
of an earlier boot's exchange; the 0xFF it answers with marks where this exchange starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

SENTINEL = b"\xff"
MAX_LINE = 64 * 1024


class AgentError(Exception):
    """The channel broke: no agent answer can come on this connection."""


class AgentReadiness:
    """Where the wait for one node's agent stands; `matched` like a console search."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def restart_at_end(self) -> None:
        """The guest rebooted: the next answer must come from the agent of the new boot, and a
        new connection carries no answer meant for the old one."""
        self.close()

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None

    async def matched(self) -> str:
        """Wait until the agent answers guest-ping; returns what to log. Cancel to stop."""
        try:
            reader, writer = await self._connect()
            token = secrets.randbelow(1 << 31)
            await _send(writer, {"execute": "guest-sync-delimited", "arguments": {"id": token}},
                        SENTINEL)  # fmt: skip
            await _read_after_sentinel(reader)
            await _read_answer(reader, lambda answer: answer.get("return") == token)
            await _send(writer, {"execute": "guest-ping"})
            await _read_answer(reader, lambda answer: "return" in answer or "error" in answer)
        except (OSError, AgentError):
            self.close()
            raise
        return "the guest agent answered guest-ping"

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is None:
            self._streams = await asyncio.open_unix_connection(self.path, limit=MAX_LINE)
        return self._streams


async def _send(writer: asyncio.StreamWriter, command: dict[str, Any], prefix: bytes = b"") -> None:
    writer.write(prefix + json.dumps(command).encode() + b"\n")
    await writer.drain()


async def _read_after_sentinel(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(SENTINEL)
            return
        except asyncio.IncompleteReadError:
            raise AgentError("the guest agent's channel closed") from None
        except asyncio.LimitOverrunError as error:
            # noise before the sentinel (an old exchange's tail, or a guest writing junk):
            # drop it and keep looking, in bounded steps
            await reader.readexactly(error.consumed)


async def _read_answer(reader: asyncio.StreamReader, wanted: Any) -> dict[str, Any]:
    """The first JSON object `wanted` accepts; other lines (answers to nobody, noise) skipped."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise AgentError("the guest agent's channel closed") from None
        except asyncio.LimitOverrunError as error:
            await reader.readexactly(error.consumed)
            continue
        with contextlib.suppress(ValueError):
            answer = json.loads(line.strip(SENTINEL + b" \r\n"))
            if isinstance(answer, dict) and wanted(answer):
                return answer
