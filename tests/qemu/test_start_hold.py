"""The start hold on real QEMU 7.2 (`runtime/hold.py`): launches that start together return
with their CPUs running, each released only after every one of them answered; a node whose
file says `-S` stays paused; and a QEMU whose CPUs never ran (a qlinkd that ended before
releasing it) runs once it is adopted."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from qlink.plan.argv import HostFacts, build_argv
from qlink.plan.lab import NodePlan, plan_lab
from qlink.plan.paths import Layout
from qlink.runtime.handles import MonitorHandle, ProcessHandle, VmRuntime
from qlink.runtime.links import LinkSocket
from qlink.runtime.ports import ports_in_use
from qlink.runtime.process import launch
from qlink.topology import parse_topology_text
from tests.conftest import GuestFiles

pytestmark = pytest.mark.qemu

TIMEOUT = 30.0


def trio(root: Path, guest: GuestFiles) -> dict[str, NodePlan]:
    lab = parse_topology_text(
        f"""\
name: trio
defaults: {{memory: 64, accel: tcg, kernel: {guest.kernel}}}
nodes:
  r1: {{}}
  r2: {{}}
  paused: {{extra_args: ["-S"]}}
links:
  - [r1:eth1, r2:eth1]
  - [r2:eth2, paused:eth1]
""",
        "trio.yaml",
    )
    busy = ports_in_use(tcp=False)
    plan, _ = plan_lab(lab, Layout.under(root), busy_udp=busy.udp)
    return plan.nodes


async def run_state(qmp: MonitorHandle) -> str:
    status: dict[str, Any] = await qmp.execute("query-status")
    return str(status["status"])


async def quit_all(launched: list[tuple[ProcessHandle, MonitorHandle]]) -> None:
    for process, qmp in launched:
        await qmp.execute("quit")
        await process.wait()
        await qmp.close()


async def test_qemus_that_start_together_run_once_all_answered(
    short_root: Path, guest_files: GuestFiles, qemu_binary: str
) -> None:
    nodes = trio(short_root, guest_files)
    host = HostFacts(qemu_binary=qemu_binary)
    runtime = VmRuntime()
    with capture_logs() as logs:
        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(runtime.launch(build_argv(node, host), node, TIMEOUT, name))
                for name, node in nodes.items()
            ]
    launched = [task.result() for task in tasks]
    try:
        states = {
            name: await run_state(qmp) for name, (_, qmp) in zip(nodes, launched, strict=True)
        }
        assert states == {"r1": "running", "r2": "running", "paused": "prelaunch"}
    finally:
        await quit_all(launched)
    marks = [entry["marks"] for entry in logs if entry["event"] == "qemu_spawned"]
    assert len(marks) == 3
    last_answer = max(mark["qmp_ready"] for mark in marks)
    held = [mark for mark in marks if "released" in mark]
    assert len(held) == 2  # the paused node is never released
    assert all(mark["released"] >= last_answer for mark in held)


async def test_a_qemu_adopted_with_its_cpus_never_run_runs(
    short_root: Path, guest_files: GuestFiles, qemu_binary: str
) -> None:
    r1 = trio(short_root, guest_files)["r1"]
    argv = build_argv(r1, HostFacts(qemu_binary=qemu_binary))
    links = [LinkSocket.of(nic) for nic in r1.nics]
    # Launched and never released: what a qlinkd that ended during the hold leaves behind.
    process, first = await launch(argv, r1.paths, TIMEOUT, "first", links=links)
    monitor: MonitorHandle = first
    try:
        assert await run_state(monitor) == "prelaunch"
        await monitor.close()
        monitor = await VmRuntime().connect("adopter", r1, TIMEOUT)
        assert await run_state(monitor) == "running"
        # Paused later on purpose (`stop`): a second adoption leaves it paused.
        await monitor.execute("stop")
        await monitor.close()
        monitor = await VmRuntime().connect("again", r1, TIMEOUT)
        assert await run_state(monitor) == "paused"
    finally:
        await monitor.close()
        process.send_signal(signal.SIGKILL)
        await process.wait()
