"""The console hub without QEMU: a node of a fake runtime, its console socket served by the
test. The hub connects once the node runs, fans output out, passes keystrokes in, waits
through a restart and ends its viewers' sessions when the lab goes down."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlink.api.consoles import Consoles, HubState, Outbox
from tests.fakes import FakeRuntime
from tests.test_daemon_core import TRIANGLE, serving, up

DEADLINE = 5.0


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qlh-", dir="/tmp"))  # unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeSerialPort:
    """What QEMU's `-chardev socket,server=on` is to the hub: one client at a time."""

    def __init__(self) -> None:
        self.typed = bytearray()
        self.clients = 0
        self.got_input = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    def hang_up(self) -> None:
        """As QEMU's exit does: every connection closed."""
        for writer in self.writers:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        self.writers.append(writer)
        writer.write(f"login: (client {self.clients})\n".encode())
        await writer.drain()
        while data := await reader.read(1024):
            self.typed += data
            self.got_input.set()
        writer.close()


async def output_until(outbox: Outbox, text: str) -> str:
    seen = ""
    async with asyncio.timeout(DEADLINE):
        while text not in seen:
            items = await outbox.take()
            if not items:  # closed and drained: the last word is why
                return seen + f"[closed: {outbox.closed}]"
            for item in items:
                seen += item.decode() if isinstance(item, bytes) else f"[{item}]"
    return seen


async def test_a_hub_fans_out_types_in_and_ends_with_the_lab(root: Path) -> None:
    async with serving(root, FakeRuntime()) as daemon:
        await up(daemon, TRIANGLE)
        lab, supervisor = daemon.labs.find_node("tri/a")
        port = FakeSerialPort()
        supervisor.plan.paths.console_socket.parent.mkdir(parents=True, exist_ok=True)
        server = await asyncio.start_unix_server(
            port.serve, str(supervisor.plan.paths.console_socket)
        )
        consoles = Consoles()
        with (
            consoles.viewer(lab, supervisor) as (hub, first),
            consoles.viewer(lab, supervisor) as (
                same_hub,
                second,
            ),
        ):
            assert same_hub is hub
            await hub.settled(DEADLINE)
            assert hub.state is HubState.CONNECTED
            assert "login: (client 1)" in await output_until(first, "login:")
            assert "login: (client 1)" in await output_until(second, "login:")
            await hub.write(b"root\n")
            async with asyncio.timeout(DEADLINE):
                await port.got_input.wait()
            assert bytes(port.typed) == b"root\n"
            # A restart: QEMU hangs up, the hub waits for the new one and reconnects.
            server.close()
            port.hang_up()
            await daemon.node_command("tri/a", "restart")
            server = await asyncio.start_unix_server(
                port.serve, str(supervisor.plan.paths.console_socket)
            )
            seen = await output_until(first, "client 2")
            assert "runs again" in seen
            async with asyncio.timeout(DEADLINE):
                [event async for event in daemon.down("tri")]
            port.hang_up()  # the stopped QEMU's socket closes
            seen = await output_until(first, "no longer runs tri/a")
            assert first.closed is not None
        assert hub.viewers == 0
        server.close()
        await consoles.shutdown()
