"""`up` follows the boot order (stages, depends_on) over the fake VM runtime: a node is
launched only once the nodes it waits for are ready, and not at all if one of them fails."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qlink.daemon import Daemon
from qlink.errors import LaunchError
from tests.fakes import FakeRuntime
from tests.test_daemon_core import DEADLINE, lab_of, serving

STAGED = """\
name: staged
defaults: {kernel: /k}
nodes:
  spine: {stage: spine, ready: {console: "login:"}}
  leaf: {stage: leaf}
  host: {depends_on: [leaf]}
  free: {}
links:
  - [spine:swp1, leaf:swp51]
  - [leaf:swp1, host:eth1]
"""


def launched(runtime: FakeRuntime) -> list[str]:
    """Node names in launch order (`-name guest=NAME,...`)."""
    names = []
    for argv in runtime.launches:
        value = argv[argv.index("-name") + 1]
        names.append(value.removeprefix("guest=").split(",")[0])
    return names


async def collect(daemon: Daemon, text: str, dry_run: bool = False) -> list[dict[str, Any]]:
    async with asyncio.timeout(DEADLINE):
        return [event async for event in daemon.up(lab_of(text), dry_run=dry_run)]


async def test_dry_run_shows_the_boot_order(tmp_path: Path) -> None:
    async with serving(tmp_path, FakeRuntime()) as daemon:
        events = await collect(daemon, STAGED, dry_run=True)
    assert events[0]["boot_order"] == [["free", "spine"], ["leaf"], ["host"]]


async def test_a_node_starts_once_what_it_waits_for_is_ready(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        with daemon.subscribe() as events:
            task = asyncio.create_task(collect(daemon, STAGED))
            waits: dict[str, list[str]] = {}
            async with asyncio.timeout(DEADLINE):
                while len(waits) < 2 or len(runtime.launches) < 2:
                    event = await events.get()
                    if event["event"] == "boot_wait":
                        waits[event["node"]] = event["waits_for"]
            assert waits == {"leaf": ["spine"], "host": ["leaf"]}
            # spine runs, but its guest has not said its ready line: leaf waits.
            await asyncio.sleep(0.2)
            assert sorted(launched(runtime)) == ["free", "spine"]
            _, spine = daemon.labs.find_node("staged/spine")
            with spine.plan.paths.console_log.open("a") as log:
                log.write("spine login: ")
            done = await task
        assert launched(runtime)[2:] == ["leaf", "host"]
        assert done[-1]["failed"] == {}


async def test_a_node_whose_dependency_fails_is_not_started(tmp_path: Path) -> None:
    failure = LaunchError("refused", argv=[], returncode=1, stderr_tail="")
    runtime = FakeRuntime(script=[None, failure, failure, failure, failure])
    text = STAGED.replace('ready: {console: "login:"}', "restart: never")
    async with serving(tmp_path, runtime) as daemon:
        done = (await collect(daemon, text))[-1]
    assert "spine" in done["failed"]
    assert done["failed"]["leaf"].startswith("not started: it waits for spine, which is failed")
    assert "host" in done["failed"]
    assert "leaf" not in launched(runtime)
