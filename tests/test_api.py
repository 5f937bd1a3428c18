"""The control API and qlinkctl over a daemon with a fake VM runtime: the HTTP statuses the
API alone chooses, the exit codes the CLI alone chooses, and `qlinkctl events`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qlink.api.app import serve_api
from qlink.cli.client import Client
from qlink.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from qlink.cli.main import run
from qlink.daemon import Daemon
from qlink.plan.paths import Layout
from tests.fakes import FakeRuntime
from tests.test_daemon_core import TRIANGLE, serving, up
from tests.test_hardening_parse import BOMB_IN_NODES

DEADLINE = 10.0
LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qla-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def api(root: Path) -> AsyncIterator[Daemon]:
    async with serving(root, FakeRuntime()) as daemon:
        ready = asyncio.Event()
        task = asyncio.create_task(serve_api(daemon, Layout.under(root).control_socket, ready))
        await ready.wait()
        try:
            yield daemon
        finally:
            task.cancel()
            await asyncio.wait({task})


async def qlinkctl(root: Path, *argv: str) -> tuple[int, str, str]:
    """qlinkctl in a thread (it is blocking), with its stdout and stderr. The daemon runs in
    this process too, and its log lines (structlog's default, on stdout) are left out."""
    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return run(["--root", str(root), *argv])

    async with asyncio.timeout(DEADLINE):
        code = await asyncio.to_thread(call)
    ours = [line for line in out.getvalue().splitlines(keepends=True) if not LOG.match(line)]
    return code, "".join(ours), err.getvalue()


async def test_domain_errors_become_statuses_and_exit_codes(root: Path) -> None:
    async with api(root) as daemon:
        await up(daemon, TRIANGLE)
        code, _, err = await qlinkctl(root, "start", "nowhere")
        assert (code, err.splitlines()[0]) == (
            EXIT_USAGE, "qlinkctl: no node 'nowhere' in any lab that is up"
        )  # fmt: skip
        code, _, err = await qlinkctl(root, "link", "down", "a")
        assert code == EXIT_USAGE
        assert "say NODE:INTERFACE" in err
        assert (await qlinkctl(root, "stop", "b"))[0] == EXIT_OK
        code, _, err = await qlinkctl(root, "qmp", "b", "query-status")
        assert (code, err.strip()) == (EXIT_FAILED, "qlinkctl: b is stopped, not running")
        code, out, _ = await qlinkctl(root, "links", "-o", "json")
        rows = {row["a"]["endpoint"]: row for row in json.loads(out)}
        assert rows["a:eth1"]["a"]["carrier"] == "down (b not running)"
        assert rows["a:eth1"]["b"]["carrier"] == "none (stopped)"


async def test_events_streams_what_happens_as_it_happens(root: Path) -> None:
    async with api(root) as daemon:
        await up(daemon, TRIANGLE)
        following = asyncio.create_task(qlinkctl(root, "events", "tri", "-o", "json", "-n", "4"))
        async with asyncio.timeout(DEADLINE):
            await daemon.events.until_subscribers(1)
        await daemon.node_command("c", "stop")
        code, out, _ = await following
        events = [json.loads(line) for line in out.splitlines()]
        assert code == EXIT_OK
        assert events.pop(0) == {"event": "subscribed"}
        assert [(e["event"], e.get("node"), e.get("state")) for e in events[:2]] == [
            ("node_state", "c", "stopping"),
            ("node_state", "c", "stopped"),
        ]
        assert {(e["event"], e["node"]) for e in events[2:]} == {("carrier", "a"), ("carrier", "b")}
        async with asyncio.timeout(DEADLINE):
            await daemon.events.until_subscribers(0)  # the first client's stream has ended
        following = asyncio.create_task(qlinkctl(root, "events", "-n", "2"))
        async with asyncio.timeout(DEADLINE):
            await daemon.events.until_subscribers(1)
        await daemon.node_command("c", "start")
        code, out, _ = await following
        lines = out.splitlines()
        assert lines[0].endswith("  tri/c  starting")
        assert "  tri/c  running (pid " in lines[1]


async def test_status_keeps_answering_while_hostile_or_huge_files_are_parsed(root: Path) -> None:
    """A 1 KB alias bomb once froze qlinkd for as long as it parsed (45 s and more), and with
    it every lab's supervision. Now it is refused at once, and a file near the size cap is
    parsed off the event loop while `status` keeps answering."""
    bomb = root / "bomb.yaml"
    bomb.write_text(BOMB_IN_NODES)
    huge = root / "huge.yaml"
    padding = "# " + "x" * 1000 + "\n"
    kernel = root / "vmlinuz"
    kernel.touch()  # the daemon checks that the files a lab names are there
    text = TRIANGLE.replace("name: tri", "name: huge").replace("/k", str(kernel))
    huge.write_text(text + padding * 3500)  # ~3.5 MB
    async with api(root) as daemon:
        await up(daemon, TRIANGLE)
        slowest = 0.0

        client = Client(Layout.under(root).control_socket, timeout=10)

        async def watch_status(until: asyncio.Future[Any]) -> None:
            nonlocal slowest
            while not until.done():
                started = time.monotonic()
                nodes = (await asyncio.to_thread(client.get, "/status"))["nodes"]
                slowest = max(slowest, time.monotonic() - started)
                assert len(nodes) >= 3  # the huge lab may be up already

        for lab, expected in ((bomb, EXIT_USAGE), (huge, EXIT_OK)):
            upping = asyncio.ensure_future(qlinkctl(root, "up", str(lab)))
            await watch_status(upping)
            code, _, err = await upping
            assert code == expected, err
        assert "alias" in err or code == EXIT_OK
        assert slowest < 1.0, f"status took {slowest:.2f} s while a file was parsed"
