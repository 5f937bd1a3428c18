"""The daemon's core with a fake VM runtime: up, live edits, restarts, carrier, events and
re-adoption, without QEMU. Every wait is on the daemon's own events or a command's answer,
under a deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from qlink.daemon import Daemon
from qlink.daemon.events import Subscription
from qlink.errors import Conflict, Gone, Invalid, NotFound, QmpCommandError, VmError
from qlink.plan.argv import HostFacts
from qlink.plan.paths import Layout
from qlink.policy import Backoff, Liveness, SupervisorSettings
from qlink.runtime.process import StopTimeouts
from qlink.topology import Lab, parse_topology_text
from tests.fakes import FakeMonitor, FakeRuntime

DEADLINE = 5.0
SETTINGS = SupervisorSettings(
    backoff=Backoff(initial=0.01, factor=2.0, cap=0.04, jitter=0.2, attempts=3),
    liveness=Liveness(interval=60.0),
    stop_timeouts=StopTimeouts(powerdown=0.05, quit=0.05, sigterm=0.05, sigkill=0.05),
    launch_timeout=1.0,
    unplug_timeout=0.5,
)

TRIANGLE = """\
name: tri
defaults: {kernel: /k}
nodes: {a: {}, b: {}, c: {}}
links:
  - [a:eth1, b:eth1]
  - [b:eth2, c:eth2]
  - [c:eth3, a:eth3]
"""


def lab_of(text: str) -> Lab:
    return parse_topology_text(text, "lab.yaml")


@asynccontextmanager
async def serving(root: Path, runtime: FakeRuntime) -> AsyncIterator[Daemon]:
    """A daemon serving until the block ends; a daemon that dies on its own fails the test."""
    daemon = Daemon(Layout.under(root), HostFacts(), SETTINGS, runtime=runtime)
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.serve(ready=ready.set))
    async with asyncio.timeout(DEADLINE):
        await ready.wait()
    try:
        yield daemon
        assert not task.done(), f"the daemon stopped serving: {task!r}"
    finally:
        task.cancel()
        await asyncio.wait({task})


async def up(daemon: Daemon, text: str) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        events = [event async for event in daemon.up(lab_of(text))]
    done: dict[str, Any] = events[-1]
    return done


async def until(
    subscription: Subscription, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        while not wanted(event := await subscription.get()):
            pass
    return event


async def carrier_set(subscription: Subscription, *nodes: str, up: bool | None = None) -> None:
    """Until a carrier event came for each of `nodes` (in any order)."""
    missing = set(nodes)
    async with asyncio.timeout(DEADLINE):
        while missing:
            event = await subscription.get()
            if event["event"] == "carrier" and up in (None, event["up"]):
                missing.discard(event["node"])


def ends(daemon: Daemon) -> dict[str, str]:
    """Every link end's carrier as `links` shows it."""
    return {row[side]["endpoint"]: row[side]["carrier"] for row in daemon.links() for side in "ab"}


def monitor_of(runtime: FakeRuntime, daemon: Daemon, node: str, lab: str = "tri") -> FakeMonitor:
    pid = next(row["pid"] for row in daemon.status() if (row["lab"], row["node"]) == (lab, node))
    return runtime.monitors[[p.pid for p in runtime.processes].index(pid)]


async def test_up_starts_every_node_and_links_show_the_carrier_qemu_has(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        with daemon.subscribe() as events:
            assert (await up(daemon, TRIANGLE))["failed"] == {}
            states = {row["node"]: row["state"] for row in daemon.status()}
            assert states == {"a": "running", "b": "running", "c": "running"}
            # Fresh QEMUs have every link up: no set_link was needed, and links says so.
            assert set(ends(daemon).values()) == {"up"}
            assert all("set_link" not in m.commands for m in runtime.monitors)
            seen = [await until(events, lambda e: e["event"] == "node_state") for _ in range(6)]
            assert {(e["node"], e["state"]) for e in seen} >= {("a", "running"), ("c", "running")}


async def test_a_stopped_node_takes_its_peers_carrier_down_and_back(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        with daemon.subscribe() as events:
            await daemon.node_command("b", "stop")
            await carrier_set(events, "a", "c", up=False)
        shown = ends(daemon)
        assert shown["a:eth1"] == "down (b not running)"
        assert shown["c:eth2"] == "down (b not running)"
        assert shown["b:eth1"] == "none (stopped)"
        assert shown["a:eth3"] == "up"
        with daemon.subscribe() as events:
            await daemon.node_command("b", "start")
            await carrier_set(events, "a", "c", up=True)
        assert set(ends(daemon).values()) == {"up"}


async def test_link_down_answers_with_the_carrier_qemu_acknowledged(tmp_path: Path) -> None:
    """Defect 3: `links` showed the carrier qlink intended. A QEMU that refuses set_link
    leaves the end `pending`, not `down`, until it is set."""
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        refusing = monitor_of(runtime, daemon, "b")
        refusing.refuse["set_link"] = QmpCommandError("set_link", "GenericError", "no")
        row = await daemon.set_link("a:eth1", up=False)
        assert row["admin"] == "down"
        assert (row["a"]["carrier"], row["a"]["wanted"]) == ("down (admin)", "down (admin)")
        assert (row["b"]["carrier"], row["b"]["wanted"]) == ("pending", "down (admin)")
        del refusing.refuse["set_link"]
        with daemon.subscribe() as events:  # the keeper tries again by itself
            await carrier_set(events, "b")
        assert ends(daemon)["b:eth1"] == "down (admin)"


async def test_a_bug_in_a_carrier_pass_never_stops_the_daemon(tmp_path: Path) -> None:
    """Defect 1: a carrier task's unexpected error (a KeyError after a live edit, say) ended
    the daemon's task group, and with it the supervision of every lab."""
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        monitor_of(runtime, daemon, "a").refuse["set_link"] = KeyError("swp9")
        with daemon.subscribe() as events:
            await daemon.node_command("b", "stop")
            await carrier_set(events, "c")
        assert ends(daemon)["a:eth1"] == "pending"
        # Every lab is still supervised: other operations work, other labs come up.
        restarted = await daemon.node_command("c", "restart")
        assert restarted.state.value == "running"
        other = TRIANGLE.replace("name: tri", "name: other")
        assert (await up(daemon, other))["failed"] == {}
        del monitor_of(runtime, daemon, "a").refuse["set_link"]
        with daemon.subscribe() as events:
            await carrier_set(events, "a")


async def test_a_supervisor_that_dies_of_a_bug_answers_every_caller(tmp_path: Path) -> None:
    """Defect 2: a supervisor task that died left its queue unread; the next `start` waited
    forever holding the lab lock, and every later `up` and `down` with it."""

    class BuggyRuntime(FakeRuntime):
        async def launch(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in the runtime")

    runtime = BuggyRuntime()
    async with serving(tmp_path, runtime) as daemon:
        started = time.monotonic()
        done = await up(daemon, TRIANGLE)
        assert set(done["failed"]) == {"a", "b", "c"}
        assert "internal error" in done["failed"]["a"]
        with pytest.raises(VmError, match="internal error"):
            async with asyncio.timeout(DEADLINE):
                await daemon.node_command("a", "start")
        async with asyncio.timeout(DEADLINE):
            events = [event async for event in daemon.down("tri")]
        assert events[-1]["event"] == "done"
        assert time.monotonic() - started < DEADLINE


async def test_a_live_edit_plugs_nics_into_running_nodes_and_restarts_none(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        before = {row["node"]: row["pid"] for row in daemon.status()}
        wider = TRIANGLE + "  - [a:eth4, d:eth1]\n"
        wider = wider.replace("nodes: {a: {}, b: {}, c: {}}", "nodes: {a: {}, b: {}, c: {}, d: {}}")
        async with asyncio.timeout(DEADLINE):
            events = [event async for event in daemon.up(lab_of(wider))]
        plan = events[0]
        assert plan["start"] == {"d": "new node"}
        assert list(plan["replug"]) == ["a"]
        assert plan["restart"] == {}
        after = {row["node"]: row["pid"] for row in daemon.status()}
        assert {node: after[node] for node in before} == before
        monitor = monitor_of(runtime, daemon, "a")
        assert monitor.commands[-3:] == ["getfd", "netdev_add", "device_add"]  # no carrier churn
        # The NIC's socket went to QEMU bound and connected, as a launch hands it over, and
        # the backend takes it by the name it was passed under.
        a_eth4 = daemon.labs.get("tri").plan.nodes["a"].nic("eth4")  # type: ignore[union-attr]
        local = ("127.0.0.1", a_eth4.local_port)
        assert monitor.passed == {"net-eth4": (local, ("127.0.0.1", a_eth4.remote_port))}
        assert monitor.arguments[-2] == {
            "type": "dgram", "id": "net-eth4", "local": {"type": "fd", "str": "net-eth4"},
        }  # fmt: skip
        # The daemon kept no copy: the port is free again (the fake QEMU holds nothing).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(local)
        assert set(ends(daemon).values()) == {"up"}
        # Back to the triangle: d goes, a's NIC is unplugged, nobody restarts.
        async with asyncio.timeout(DEADLINE):
            events = [event async for event in daemon.up(lab_of(TRIANGLE))]
        assert events[0]["remove"] == {"d": "not in the file any more"}
        assert "device_del" in monitor_of(runtime, daemon, "a").commands
        assert {row["node"]: row["pid"] for row in daemon.status()} == before


async def test_a_refused_hotplug_falls_back_to_a_restart(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        old_pid = next(row["pid"] for row in daemon.status() if row["node"] == "a")
        monitor_of(runtime, daemon, "a").refuse["device_add"] = QmpCommandError(
            "device_add", "GenericError", "Bus does not support hotplugging"
        )
        wider = TRIANGLE + "  - [a:eth5, b:eth5]\n"
        async with asyncio.timeout(DEADLINE):
            events = [event async for event in daemon.up(lab_of(wider))]
        assert events[-1]["failed"] == {}
        pids = {row["node"]: row["pid"] for row in daemon.status()}
        assert pids["a"] != old_pid


async def test_a_new_daemon_adopts_every_vm_without_a_launch(tmp_path: Path) -> None:
    first = FakeRuntime()
    async with serving(tmp_path, first) as daemon:
        await up(daemon, TRIANGLE)
        await daemon.set_link("a:eth1", up=False)
        pids = {row["node"]: row["pid"] for row in daemon.status()}
    assert not any(process.exited for process in first.processes)  # the VMs outlived it

    second = FakeRuntime(first_pid=5000)
    second.left_running = {process.pid: process for process in first.processes}
    async with serving(tmp_path, second) as daemon:
        status = {row["node"]: (row["state"], row["pid"]) for row in daemon.status()}
        assert status == {node: ("running", pid) for node, pid in pids.items()}
        assert second.launches == []
        # An adopted QEMU's carrier is unknown until set: the keeper sets every cut end.
        with daemon.subscribe() as events:
            await daemon.set_link("a:eth1", up=False)
        shown = ends(daemon)
        assert (shown["a:eth1"], shown["b:eth1"]) == ("down (admin)", "down (admin)")
        del events


async def test_lookups_raise_domain_errors_not_http_statuses(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        await up(daemon, TRIANGLE.replace("name: tri", "name: two"))
        with pytest.raises(NotFound):
            await daemon.node_command("zz", "start")
        with pytest.raises(Conflict, match="several labs"):
            await daemon.node_command("a", "stop")
        with pytest.raises(Invalid):
            await daemon.node_command("tri/a", "reboot")
        with pytest.raises(Invalid):
            await daemon.set_link("tri/a", up=False)
        with pytest.raises(NotFound, match="no interface"):
            await daemon.set_link("tri/a:eth9", up=False)
        with pytest.raises(NotFound):
            [event async for event in daemon.down("nope")]
        await daemon.node_command("tri/a", "stop")
        with pytest.raises(Conflict, match="stopped, not running"):
            await daemon.qmp("tri/a", "query-status", {})


async def test_a_removed_node_answers_late_callers_at_once(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        lab = daemon.labs.get("tri")
        assert lab is not None
        supervisor = lab.supervisors["c"]
        async with asyncio.timeout(DEADLINE):
            [event async for event in daemon.down("tri")]
            await supervisor.retired.wait()
        with pytest.raises(Gone):
            await supervisor.submit("start")


async def test_down_force_skips_every_guests_acpi_power_down(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    async with serving(tmp_path, runtime) as daemon:
        await up(daemon, TRIANGLE)
        async with asyncio.timeout(DEADLINE):
            events = [event async for event in daemon.down("tri", graceful=False)]
        assert events[-1] == {"event": "done", "lab": "tri", "failed": {}}
        assert [stop.graceful for stop in runtime.stops] == [False, False, False]


async def test_the_scan_replaces_a_stopped_qemu_and_only_that_one(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    fast = dataclasses.replace(
        SETTINGS, liveness=Liveness(interval=60.0, state_interval=0.01, stopped_checks=2)
    )
    daemon = Daemon(Layout.under(tmp_path), HostFacts(), fast, runtime=runtime)
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.serve(ready=ready.set))
    try:
        async with asyncio.timeout(DEADLINE):
            await ready.wait()
        await up(daemon, TRIANGLE)
        before = {row["node"]: row["pid"] for row in daemon.status()}
        stopped = next(p for p in runtime.processes if p.pid == before["b"])
        with daemon.subscribe() as events:
            stopped.send_signal(signal.SIGSTOP)
            async with asyncio.timeout(DEADLINE):
                while not (
                    (e := await events.get()).get("node") == "b" and e["state"] == "running"
                ):
                    pass
        after = {row["node"]: row["pid"] for row in daemon.status()}
        assert after["b"] != before["b"]
        assert (after["a"], after["c"]) == (before["a"], before["c"])
    finally:
        task.cancel()
        await asyncio.wait({task})
