"""Readiness from the console log, without QEMU: the search itself, and a node of a fake
runtime going ready, losing it on a guest reset, and `wait` answering for it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from qlink.errors import ConfigError
from qlink.runtime.console_ready import READ_GAP, ConsoleReadiness
from qlink.topology import parse_topology_text
from tests.fakes import FakeRuntime
from tests.test_daemon_core import DEADLINE, carrier_set, ends, serving, up

READY_LAB = """\
name: r
defaults: {kernel: /k, ready: {console: "login: *$"}}
nodes:
  a: {}
  b: {ready: {console: "qlink-ready name=b"}}
  c: {ready: null}
links:
  - [a:eth1, b:eth1]
"""


async def test_a_line_matches_once_it_is_written_and_earlier_output_does_not_count(
    tmp_path: Path,
) -> None:
    console = tmp_path / "node" / "console.log"
    console.parent.mkdir()
    console.write_text("login: \nan old boot\n")
    search = ConsoleReadiness(console, "login: *$", console.stat().st_size)
    waiting = asyncio.ensure_future(search.matched())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    with console.open("a") as log:
        log.write("Debian GNU/Linux 12 r1 ttyS0\n\n")
        log.flush()
        await asyncio.sleep(0.05)
        assert not waiting.done()
        log.write("r1 login: ")  # a prompt ends without a newline
    async with asyncio.timeout(DEADLINE):
        line = await waiting
    assert line == "r1 login:"


class CountingReadiness(ConsoleReadiness):
    reads = 0

    def _read_new(self) -> str | None:
        self.reads += 1
        return super()._read_new()


async def test_a_log_written_a_byte_at_a_time_is_read_once_per_gap_not_once_per_byte(
    tmp_path: Path,
) -> None:
    """As QEMU writes a console log (one write per byte the UART sends)."""
    console = tmp_path / "console.log"
    console.write_bytes(b"")
    search = CountingReadiness(console, "qlink-ready", 0)
    waiting = asyncio.ensure_future(search.matched())
    boot = b"[    0.000000] Linux version 6.1.0 (a boot that prints)\n" * 10 + b"qlink-ready\n"
    started = time.monotonic()
    with console.open("ab", buffering=0) as log:
        for byte in boot:
            log.write(bytes([byte]))
            await asyncio.sleep(0.0005)
    async with asyncio.timeout(DEADLINE):
        assert await waiting == "qlink-ready"
    took = time.monotonic() - started
    assert len(boot) > 500
    assert search.reads <= took / READ_GAP + 3, (search.reads, took)


async def test_many_logs_written_at_once_from_another_thread_each_match(tmp_path: Path) -> None:
    """A boot storm: 50 logs, each written a byte at a time by someone else while it is read,
    the ready line near the end and nothing after the prompt. A wake lost between a read and
    the next write would leave a search waiting for output that never comes."""
    nodes = [f"spine{index}" for index in range(50)]
    logs = {name: tmp_path / name / "console.log" for name in nodes}
    for log in logs.values():
        log.parent.mkdir()
        log.write_bytes(b"an earlier boot: qlink-ready name=x\n")
    waiting = [
        asyncio.ensure_future(
            ConsoleReadiness(log, f"qlink-ready name={name}$", log.stat().st_size).matched()
        )
        for name, log in logs.items()
    ]

    def boot_them_all() -> None:
        outputs = {
            name: b"[    0.1] Linux version 6.1.0\n" * 8
            + f"qlink-ready name={name}\n\n\nBusyBox v1.35.0\n{name}# \x1b[6n".encode()
            for name in nodes
        }
        handles = {name: log.open("ab", buffering=0) for name, log in logs.items()}
        try:
            for index in range(max(len(output) for output in outputs.values())):
                for name, output in outputs.items():
                    handles[name].write(output[index : index + 1])
                if index % 16 == 0:
                    time.sleep(0.001)  # let the readers in between, at varying points
        finally:
            for handle in handles.values():
                handle.close()

    await asyncio.to_thread(boot_them_all)
    async with asyncio.timeout(DEADLINE):
        lines = await asyncio.gather(*waiting)
    assert lines == [f"qlink-ready name={name}" for name in nodes]


async def test_a_pattern_that_backtracks_forever_never_stalls_the_loop(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("a" * 3000 + "!\n")
    search = ConsoleReadiness(console, r"^(a|a)*$", 0)
    started = time.monotonic()
    waiting = asyncio.ensure_future(search.matched())
    await asyncio.sleep(0.3)
    assert not waiting.done()
    waiting.cancel()
    assert time.monotonic() - started < 1.0


def test_a_pattern_that_does_not_compile_is_a_located_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_topology_text("name: l\nnodes:\n  a:\n    ready: {console: 'a(b'}\n", "l.yaml")
    (issue,) = caught.value.issues
    assert (issue.line, issue.field) == (4, "nodes.a.ready.console")
    assert "not a regular expression" in issue.message


async def test_nodes_turn_ready_lose_it_on_a_guest_reset_and_wait_answers(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, READY_LAB)
        rows = {row["node"]: row for row in daemon.status()}
        assert {name: row["ready"] for name, row in rows.items()} == {
            "a": False, "b": False, "c": True,
        }  # fmt: skip
        not_ready = await daemon.wait_ready(["r/a"], timeout=0.2)
        assert not_ready == {
            "r/a": "running, but still waiting for a console line to match 'login: *$'"
        }

        lab, supervisor = daemon.labs.find_node("r/a")
        console = supervisor.plan.paths.console_log
        with daemon.subscribe() as events:
            with console.open("a") as log:
                log.write("a login: ")
            async with asyncio.timeout(DEADLINE):
                assert await daemon.wait_ready(["r/a"], timeout=DEADLINE) == {}
                while (event := await events.get())["event"] != "node_state":
                    pass
        assert event["node"] == "a"
        assert event["ready"] is True
        assert event["time_to_ready"] is not None

        monitor = runtime.monitors[[p.pid for p in runtime.processes].index(event["pid"])]
        monitor.inject("RESET", guest=True)
        await monitor.drained()
        assert not next(row for row in daemon.status() if row["node"] == "a")["ready"]
        with console.open("a") as log:
            log.write("\nrebooting...\na login: ")
        assert await daemon.wait_ready(["r/a"], timeout=DEADLINE) == {}

        # Every node, none named: b never says its line.
        assert await daemon.wait_ready([], timeout=0.2) == {
            "r/b": "running, but still waiting for a console line to match 'qlink-ready name=b'"
        }
        del lab


FOLLOWS_READY_LAB = """\
name: f
carrier_follows_peer: ready
defaults: {kernel: /k}
nodes:
  a: {ready: {console: "login: *$"}}
  b: {}
links:
  - [a:eth1, b:eth1]
"""


async def test_with_carrier_following_readiness_a_guest_reset_takes_the_peer_down_until_ready(
    tmp_path: Path,
) -> None:
    """`carrier_follows_peer: ready`: b's port is down while a boots, up once a is ready,
    down at a's own reboot (same QEMU) and up again when a says so once more."""
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        with daemon.subscribe() as events:
            await up(daemon, FOLLOWS_READY_LAB)
            await carrier_set(events, "b", up=False)
        assert ends(daemon)["b:eth1"] == "down (a not ready)"
        assert ends(daemon)["a:eth1"] == "up"  # b has no `ready:`: ready when it runs

        _, supervisor = daemon.labs.find_node("f/a")
        console = supervisor.plan.paths.console_log
        with daemon.subscribe() as events:
            with console.open("a") as log:
                log.write("a login: ")
            await carrier_set(events, "b", up=True)

        pid = supervisor.status.pid
        assert pid is not None
        monitor = runtime.monitors[[p.pid for p in runtime.processes].index(pid)]
        with daemon.subscribe() as events:
            monitor.inject("RESET", guest=True)
            await carrier_set(events, "b", up=False)
            assert supervisor.status.pid == pid
            with console.open("a") as log:
                log.write("\nrebooting...\na login: ")
            await carrier_set(events, "b", up=True)
        assert ends(daemon)["b:eth1"] == "up"
