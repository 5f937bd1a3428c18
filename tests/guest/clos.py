"""The CLOS lab of configs/clos.yaml as the real-guest tests drive it: its cabling, a handle
on the running lab (`ClosLab`, from the `clos` fixture in tests/guest/conftest.py), and the
LLDP check that every port sees the node and port the cabling says.

Cabling: spineS:swpL <-> leafL:swp5S, addressed 10.S.L.0/31 on the spine, 10.S.L.1/31 on the
leaf. Tests that add nodes (a leaf5) extend `ClosLab.nodes` and the links they expect.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import Qlinkd, cmdline_of, qemu_pid_of
from tests.guest.harness import (
    GuestConsole,
    close_consoles,
    foreign_holders_of_ports,
    kill_qemu_under,
    lldp_neighbors,
    open_consoles,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "clos.yaml"
LAB = "clos"
SPINES = ("spine1", "spine2")
LEAVES = ("leaf1", "leaf2", "leaf3", "leaf4")
NODES = SPINES + LEAVES
# The guest may ignore ACPI power-down; a restart then waits this long before QMP `quit`.
DAEMON_ARGS = ["--powerdown-timeout", "10"]

BOOT_TIMEOUT = 300.0  # six guests booting at once on two cores under TCG
REBOOT_TIMEOUT = 180.0  # one guest, from the command to its ready line
LLDP_TIMEOUT = 30.0  # tx every second, TTL 4 s


@dataclass(frozen=True)
class Link:
    """spineS:swpL <-> leafL:swp5S, 10.S.L.0/31 on the spine, 10.S.L.1/31 on the leaf."""

    spine: int
    leaf: int

    @property
    def ends(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        """(node, port, address) of the spine end, then of the leaf end."""
        s, leaf = self.spine, self.leaf
        return (
            (f"spine{s}", f"swp{leaf}", f"10.{s}.{leaf}.0"),
            (f"leaf{leaf}", f"swp5{s}", f"10.{s}.{leaf}.1"),
        )


LINKS = [Link(spine, leaf) for spine in (1, 2) for leaf in (1, 2, 3, 4)]


def expected_neighbors(links: Iterable[Link] = LINKS) -> dict[str, dict[str, tuple[str, str]]]:
    """{node: {local port: (neighbour's system name, neighbour's port)}} from the cabling."""
    expected: dict[str, dict[str, tuple[str, str]]] = {}
    for link in links:
        (a_node, a_port, _), (b_node, b_port, _) = link.ends
        expected.setdefault(a_node, {})[a_port] = (b_node, b_port)
        expected.setdefault(b_node, {})[b_port] = (a_node, a_port)
    return expected


@dataclass
class ClosLab:
    root: Path
    daemon: Qlinkd
    plan: dict[str, Any] = field(default_factory=dict)
    nodes: tuple[str, ...] = NODES
    """The nodes the lab has now; a test that adds or removes one says so here."""
    figures: dict[str, str] = field(default_factory=dict)

    def figure(self, name: str, value: str) -> None:
        """A measurement worth reading (`pytest -s`), repeated when the lab goes down."""
        self.figures[name] = value
        print(f"\nFIGURE {name}: {value}", flush=True)

    def load_plan(self, topology: Path) -> None:
        """The paths and argv of every node, as qlinkctl plans `topology`."""
        self.plan = json.loads(self.daemon.ctl_ok("plan", str(topology), "-o", "json"))

    def node_paths(self, node: str) -> dict[str, str]:
        paths: dict[str, str] = self.plan["nodes"][node]["paths"]
        return paths

    def console_logs(self, *nodes: str) -> dict[str, Path]:
        return {node: Path(self.node_paths(node)["console_log"]) for node in nodes or self.nodes}

    def console_sockets(self, *nodes: str) -> dict[str, Path]:
        return {node: Path(self.node_paths(node)["console_socket"]) for node in nodes or self.nodes}

    def planned_mac(self, node: str, interface: str) -> str:
        nics = self.plan["nodes"][node]["nics"]
        mac: str = next(nic["mac"] for nic in nics if nic["interface"] == interface)
        return mac

    def planned_argv(self, node: str) -> list[str]:
        argv: list[str] = self.plan["nodes"][node]["argv"]
        return argv

    def udp_ports(self) -> set[int]:
        return {
            int(nic["local"].rpartition(":")[2])
            for node in self.plan["nodes"].values()
            for nic in node["nics"]
        }

    async def watch_for_intruders(self, seen: dict[int, str]) -> None:
        """Until cancelled, note every foreign process holding one of the lab's UDP ports."""
        ports = self.udp_ports()
        while True:
            seen.update(await asyncio.to_thread(foreign_holders_of_ports, ports, self.root))
            await asyncio.sleep(0.5)

    def status(self) -> dict[str, dict[str, Any]]:
        return {key.split("/", 1)[1]: row for key, row in self.daemon.status().items()
                if key.startswith(f"{LAB}/")}  # fmt: skip

    def status_pids(self) -> dict[str, int | None]:
        return {node: row["pid"] for node, row in self.status().items()}

    def pidfile_pids(self) -> dict[str, int]:
        return {node: qemu_pid_of(self.root, LAB, node) for node in self.nodes}

    def running_pids(self) -> dict[str, int]:
        """Every node's PID, after checking that status and pidfiles agree it runs."""
        status = self.status()
        assert {node: row["state"] for node, row in status.items()} == dict.fromkeys(
            self.nodes, "running"
        ), status
        pids = {node: row["pid"] for node, row in status.items()}
        assert pids == self.pidfile_pids(), f"status {pids} != pidfiles {self.pidfile_pids()}"
        return pids

    def daemon_events(self, event: str, node: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines with this event (and node)."""
        found = []
        for line in self.daemon.log().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event and node in (None, record.get("node")):
                found.append(record)
        return found

    async def wait_status(
        self,
        predicate: Callable[[dict[str, dict[str, Any]]], bool],
        timeout: float,
        what: str,
    ) -> dict[str, dict[str, Any]]:
        """Ask `status` twice a second until `predicate(status)` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await asyncio.to_thread(self.status)
            if predicate(status):
                return status
            if loop.time() >= deadline:
                raise AssertionError(f"{what}: not within {timeout:g} s; status: {status}")
            await asyncio.sleep(0.5)

    @asynccontextmanager
    async def consoles(self, *nodes: str) -> AsyncIterator[dict[str, GuestConsole]]:
        opened = await open_consoles(self.console_sockets(*nodes))
        try:
            yield opened
        finally:
            await close_consoles(opened)


def take_down(lab: ClosLab) -> list[str]:
    """Down the lab, stop the daemon, kill (by PID) any QEMU left; returns what went wrong."""
    problems = []
    daemon = lab.daemon
    if daemon.process is not None and daemon.process.poll() is None:
        try:
            result = daemon.ctl("down", LAB, timeout=180)
            if result.returncode != 0:
                problems.append(f"`down {LAB}` exited {result.returncode}: {result.stderr}")
        except subprocess.TimeoutExpired:
            problems.append(f"`down {LAB}` took more than 180 s")
        try:
            daemon.stop()
        except subprocess.TimeoutExpired:
            problems.append("qlinkd did not stop on SIGTERM within 30 s")
            daemon.kill()
    else:
        problems.append("no qlinkd was running at the end: the lab could not be taken down")
    leftovers = kill_qemu_under(lab.root)
    if leftovers:
        problems.append(f"QEMU left running after the lab went down, killed: {leftovers}")
    return problems


async def wait_lldp(
    consoles: Mapping[str, GuestConsole],
    links: Iterable[Link] = LINKS,
    timeout: float = LLDP_TIMEOUT,
) -> float:
    """Until every console's node sees exactly its neighbours on `links`; returns the wait."""
    expected = expected_neighbors(links)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        seen = dict(
            zip(
                consoles,
                await asyncio.gather(*(lldp_neighbors(c) for c in consoles.values())),
                strict=True,
            )
        )
        wrong = {node: seen[node] for node in consoles if seen[node] != expected.get(node, {})}
        if not wrong:
            return loop.time() - started
        if loop.time() - started >= timeout:
            raise AssertionError(
                f"LLDP not converged within {timeout:g} s:\n"
                + "\n".join(f"  {n}: saw {wrong[n]}, expected {expected.get(n, {})}" for n in wrong)
            )
        await asyncio.sleep(1.0)


def assert_same_machine(lab: ClosLab, node: str, argv_before: list[str], new_pid: int) -> None:
    """The new process is the same machine on the same wires: identical argv."""
    argv_after = cmdline_of(new_pid)
    assert argv_after == argv_before, f"{node}: argv changed:\n{argv_before}\n{argv_after}"
    assert argv_after == lab.planned_argv(node)
