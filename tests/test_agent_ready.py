"""The guest agent's readiness against an agent that speaks its protocol on a unix socket, as
QEMU's chardev presents it: nothing is read until the guest opens the port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qlink.runtime.agent_ready import AgentError, AgentReadiness


class FakeAgent:
    """qemu-ga as seen through the channel; `started` gates its reads like the guest's port."""

    def __init__(self, noise: bytes = b"") -> None:
        self.started = asyncio.Event()
        self.requests: list[dict[str, object]] = []
        self.noise = noise

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.started.wait()
        writer.write(self.noise)
        while line := await reader.readline():
            request = json.loads(line.lstrip(b"\xff"))
            self.requests.append(request)
            if request["execute"] == "guest-sync-delimited":
                token = request["arguments"]["id"]
                writer.write(b"\xff" + json.dumps({"return": token}).encode() + b"\n")
            else:
                writer.write(b'{"return": {}}\n')
            await writer.drain()


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[tuple[FakeAgent, Path]]:
    agent, path = FakeAgent(noise=b'{"return": 1}\n\x00garbage'), tmp_path / "agent.sock"
    server = await asyncio.start_unix_server(agent.serve, path)
    async with server:
        yield agent, path


async def test_ready_once_the_agent_starts_and_answers(channel: tuple[FakeAgent, Path]) -> None:
    agent, path = channel
    readiness = AgentReadiness(path)
    waiting = asyncio.create_task(readiness.matched())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "ready before the agent ran"
    agent.started.set()
    assert "guest-ping" in await asyncio.wait_for(waiting, 5)
    assert [request["execute"] for request in agent.requests] == [
        "guest-sync-delimited",
        "guest-ping",
    ]
    readiness.close()


async def test_after_a_reset_the_agent_is_asked_again(channel: tuple[FakeAgent, Path]) -> None:
    agent, path = channel
    agent.started.set()
    readiness = AgentReadiness(path)
    await asyncio.wait_for(readiness.matched(), 5)
    readiness.restart_at_end()
    await asyncio.wait_for(readiness.matched(), 5)
    assert len(agent.requests) == 4
    readiness.close()


async def test_a_closed_channel_is_an_error_not_a_hang(tmp_path: Path) -> None:
    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    path = tmp_path / "agent.sock"
    async with await asyncio.start_unix_server(hang_up, path):
        with pytest.raises((AgentError, ConnectionError)):
            await asyncio.wait_for(AgentReadiness(path).matched(), 5)


async def test_no_channel_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await AgentReadiness(tmp_path / "absent.sock").matched()


async def test_megabytes_of_noise_before_the_answer_are_skipped(tmp_path: Path) -> None:
    """A guest may write anything on the channel: it is read through in bounded steps."""
    agent, path = FakeAgent(noise=b"x" * (4 << 20)), tmp_path / "agent.sock"
    agent.started.set()
    async with await asyncio.start_unix_server(agent.serve, path):
        readiness = AgentReadiness(path)
        assert "guest-ping" in await asyncio.wait_for(readiness.matched(), 30)
        readiness.close()
