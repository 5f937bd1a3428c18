"""The CLOS lab (configs/clos.yaml) end to end, with real guests under a real qlinkd.

The lab comes up once for the module (about a minute under TCG); the tests run in order and
each leaves the lab as the next expects it:

a. every link pings from both ends, and every port's LLDP neighbour is the right node and
   port, seen from both sides;
b. `qlinkctl restart spine1` replaces spine1's QEMU only (same argv, so same MACs and ports),
   a ping across leaf1-spine2 during the whole restart loses nothing, and spine1's LLDP
   adjacencies come back;
c. `kill -9` of leaf3's QEMU: qlinkd brings it back by itself, touching nobody else;
d. `kill -9` of qlinkd: the next qlinkd re-adopts all six VMs without restarting any, and can
   still restart one.

Timings (up, all ready, restart, restart to ready, re-adoption) are printed: `pytest -s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import GuestFiles, Qlinkd, cmdline_of, qemu_pid_of
from tests.guest.harness import (
    GuestConsole,
    close_consoles,
    foreign_qemu_on_ports,
    kill_qemu_under,
    lldp_neighbors,
    log_sizes,
    open_consoles,
    wait_ready,
)

pytestmark = [pytest.mark.guest]

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
ADOPT_WITHIN = 10.0  # a new qlinkd reports every VM running this soon after READY
PING_INTERVAL = 0.2
# Up to 10 minutes of pings; the test interrupts it once spine1 is back, whatever that took.
PING_COUNT = 3000

FIGURES: dict[str, str] = {}


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


def expected_neighbors() -> dict[str, dict[str, tuple[str, str]]]:
    """{node: {local port: (neighbour's system name, neighbour's port)}} from the cabling."""
    expected: dict[str, dict[str, tuple[str, str]]] = {node: {} for node in NODES}
    for link in LINKS:
        (a_node, a_port, _), (b_node, b_port, _) = link.ends
        expected[a_node][a_port] = (b_node, b_port)
        expected[b_node][b_port] = (a_node, a_port)
    return expected


def peer_addresses() -> dict[str, list[str]]:
    """{node: the address of the far end of each of its links}."""
    peers: dict[str, list[str]] = {node: [] for node in NODES}
    for link in LINKS:
        (a_node, _, a_ip), (b_node, _, b_ip) = link.ends
        peers[a_node].append(b_ip)
        peers[b_node].append(a_ip)
    return peers


def figure(name: str, value: str) -> None:
    FIGURES[name] = value
    print(f"\nFIGURE {name}: {value}", flush=True)


# --- the lab, once for the module ---------------------------------------------------------


@dataclass
class ClosLab:
    root: Path
    daemon: Qlinkd
    plan: dict[str, Any] = field(default_factory=dict)

    def node_paths(self, node: str) -> dict[str, str]:
        paths: dict[str, str] = self.plan["nodes"][node]["paths"]
        return paths

    def console_logs(self, *nodes: str) -> dict[str, Path]:
        return {node: Path(self.node_paths(node)["console_log"]) for node in nodes or NODES}

    def console_sockets(self, *nodes: str) -> dict[str, Path]:
        return {node: Path(self.node_paths(node)["console_socket"]) for node in nodes or NODES}

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
        """Until cancelled, note every foreign QEMU binding one of the lab's UDP ports."""
        ports = self.udp_ports()
        while True:
            seen.update(await asyncio.to_thread(foreign_qemu_on_ports, ports, self.root))
            await asyncio.sleep(0.5)

    def status(self) -> dict[str, dict[str, Any]]:
        return {key.split("/", 1)[1]: row for key, row in self.daemon.status().items()
                if key.startswith(f"{LAB}/")}  # fmt: skip

    def status_pids(self) -> dict[str, int | None]:
        return {node: row["pid"] for node, row in self.status().items()}

    def pidfile_pids(self) -> dict[str, int]:
        return {node: qemu_pid_of(self.root, LAB, node) for node in NODES}

    def running_pids(self) -> dict[str, int]:
        """Every node's PID, after checking that status and pidfiles agree it runs."""
        status = self.status()
        assert {node: row["state"] for node, row in status.items()} == dict.fromkeys(
            NODES, "running"
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


def _take_down(lab: ClosLab) -> list[str]:
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


@pytest.fixture(scope="module")
def clos(qemu_binary: str, guest_files: GuestFiles) -> Iterator[ClosLab]:
    """configs/clos.yaml up under a qlinkd of our own, all six guests ready.

    Teardown always downs the lab, stops the daemon and kills (by PID) any QEMU started
    under the root, whatever the tests did to the daemon.
    """
    root = Path(tempfile.mkdtemp(prefix="qlink-", dir="/tmp"))
    lab = ClosLab(root, Qlinkd(root, DAEMON_ARGS))
    try:
        lab.daemon.start()
        started = time.monotonic()
        lab.daemon.ctl_ok("up", str(CONFIG), timeout=300)
        up_done = time.monotonic()
        figure("up command", f"{up_done - started:.1f} s")
        lab.plan = json.loads(lab.daemon.ctl_ok("plan", str(CONFIG), "-o", "json"))
        ready = asyncio.run(wait_ready(lab.console_logs(), timeout=BOOT_TIMEOUT))
        figure(
            "all six ready after up started",
            f"{max(ready.values()) - started:.1f} s (first {min(ready.values()) - started:.1f} s)",
        )
        yield lab
    finally:
        problems = _take_down(lab)
        print(f"\nqlinkd logs: {sorted(str(p) for p in root.glob('qlinkd-*.log'))}")
        print("\n".join(f"FIGURE {name}: {value}" for name, value in FIGURES.items()))
        if os.environ.get("QLINK_KEEP_TMP"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    assert not problems, problems


async def wait_lldp(consoles: Mapping[str, GuestConsole], timeout: float = LLDP_TIMEOUT) -> float:
    """Until every console's node sees exactly its expected neighbours; returns the wait."""
    expected = expected_neighbors()
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
        wrong = {node: seen[node] for node in consoles if seen[node] != expected[node]}
        if not wrong:
            return loop.time() - started
        if loop.time() - started >= timeout:
            raise AssertionError(
                f"LLDP not converged within {timeout:g} s:\n"
                + "\n".join(f"  {n}: saw {wrong[n]}, expected {expected[n]}" for n in wrong)
            )
        await asyncio.sleep(1.0)


def assert_same_machine(lab: ClosLab, node: str, argv_before: list[str], new_pid: int) -> None:
    """The new process is the same machine on the same wires: identical argv."""
    argv_after = cmdline_of(new_pid)
    assert argv_after == argv_before, f"{node}: argv changed:\n{argv_before}\n{argv_after}"
    assert argv_after == lab.planned_argv(node)


# --- the tests, in order ------------------------------------------------------------------


@pytest.mark.timeout(900)
async def test_every_link_pings_and_lldp_sees_the_cabling(clos: ClosLab) -> None:
    pids = clos.running_pids()
    for node, pid in pids.items():
        assert cmdline_of(pid) == clos.planned_argv(node), f"{node} runs another argv"

    async with clos.consoles() as consoles:

        async def ping_peers(node: str) -> list[str]:
            failures = []
            for address in peer_addresses()[node]:
                status, output = await consoles[node].run_rc(
                    f"ping -c 2 -W 2 {address}", timeout=60
                )
                if status != 0 or " 0% packet loss" not in output:
                    failures.append(f"{node} -> {address}: status {status}\n{output}")
            return failures

        failures = [f for fs in await asyncio.gather(*map(ping_peers, NODES)) for f in fs]
        assert not failures, "\n".join(failures)
        converged = await wait_lldp(consoles)
        figure("LLDP converged (checked after the pings)", f"{converged:.1f} s")


@pytest.mark.timeout(600)
async def test_restart_spine1_touches_nobody_else(clos: ClosLab) -> None:
    ping_command = f"ping -i {PING_INTERVAL} -c {PING_COUNT} 10.2.1.0"

    # Another QEMU binding one of the lab's ports steals its frames (SO_REUSEADDR): if the
    # ping loses packets, the failure says whether one was around.
    intruders: dict[int, str] = {}
    watcher = asyncio.create_task(clos.watch_for_intruders(intruders))
    try:
        await _restart_spine1_under_ping(clos, ping_command, intruders)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _restart_spine1_under_ping(
    clos: ClosLab, ping_command: str, intruders: dict[int, str]
) -> None:
    before = clos.running_pids()
    argv_before = {node: cmdline_of(pid) for node, pid in before.items()}
    async with clos.consoles("leaf1") as consoles:
        # In the background of leaf1's shell: it keeps running while nobody is connected.
        await consoles["leaf1"].run(f"rm -f /tmp/p.txt; {ping_command} >/tmp/p.txt 2>&1 & "
                                    "echo $! >/tmp/p.pid")  # fmt: skip
        await consoles["leaf1"].run("sleep 1; grep -q 'bytes from' /tmp/p.txt")

    offsets = log_sizes(clos.console_logs("spine1"))
    started = time.monotonic()
    output = await asyncio.to_thread(clos.daemon.ctl_ok, "restart", "spine1", timeout=180)
    restarted = time.monotonic()
    ready = await wait_ready(clos.console_logs("spine1"), offsets, REBOOT_TIMEOUT)
    stopped_by = [event["step"] for event in clos.daemon_events("vm_stopped", "spine1")]
    how = stopped_by[-1] if stopped_by else "unknown"
    figure("restart spine1 command", f"{restarted - started:.1f} s (old QEMU stopped by {how})")
    figure("restart spine1 to its new ready line", f"{ready['spine1'] - started:.1f} s")

    after = clos.running_pids()
    assert after["spine1"] != before["spine1"], output
    assert f"pid {after['spine1']}" in output, output
    assert {n: p for n, p in after.items() if n != "spine1"} == {
        n: p for n, p in before.items() if n != "spine1"
    }, f"a peer was touched: before {before}, after {after}"
    assert not psutil.pid_exists(before["spine1"]) or (
        psutil.Process(before["spine1"]).status() == psutil.STATUS_ZOMBIE
    ), "the old spine1 QEMU still runs"
    assert_same_machine(clos, "spine1", argv_before["spine1"], after["spine1"])

    async with clos.consoles("spine1", *LEAVES) as consoles:
        converged = await wait_lldp(consoles)
        figure("spine1 LLDP back after its ready line", f"{converged:.1f} s")
        leaf1 = consoles["leaf1"]
        # Still going: it covered the whole restart. SIGINT makes ping print its statistics.
        interrupted, _ = await leaf1.run_rc("kill -INT $(cat /tmp/p.pid)")
        assert interrupted == 0, "the ping ended before spine1 was back"
        await leaf1.run("wait $(cat /tmp/p.pid)", timeout=30, check=False)
        summary = await leaf1.run("cat /tmp/p.txt")
    counts = re.search(r"(\d+) packets transmitted, (\d+) packets received", summary)
    assert counts is not None, summary
    sent = int(counts[1])
    replied = {int(seq) for seq in re.findall(r"seq=(\d+) ", summary)}
    # The last echo request may still have been on its way when ping was interrupted.
    lost = sorted(set(range(sent - 1)) - replied)
    figure(
        "ping leaf1 -> spine2 during the restart",
        f"{len(lost)} lost of {sent - 1} (the last request, in flight at the interrupt, "
        f"{'was answered' if sent - 1 in replied else 'is not counted'})",
    )
    assert not lost, (
        f"lost seq {lost}; foreign QEMU on the lab's ports meanwhile: {intruders or 'none'}\n"
        + summary
    )


@pytest.mark.timeout(600)
async def test_qemu_killed_comes_back_by_itself(clos: ClosLab) -> None:
    before = clos.running_pids()
    victim = before["leaf3"]
    argv_before = cmdline_of(victim)
    restarts_before = clos.status()["leaf3"]["restarts"]
    offsets = log_sizes(clos.console_logs("leaf3"))

    started = time.monotonic()
    os.kill(victim, signal.SIGKILL)  # a QEMU of this test's own lab
    status = await clos.wait_status(
        lambda s: s["leaf3"]["state"] == "running" and s["leaf3"]["pid"] not in (None, victim),
        timeout=120,
        what="leaf3 running again with a new PID",
    )
    figure("leaf3 running again after kill -9", f"{time.monotonic() - started:.1f} s")
    assert status["leaf3"]["restarts"] == restarts_before + 1, status["leaf3"]
    assert "SIGKILL" in (status["leaf3"]["last_exit"] or ""), status["leaf3"]
    ready = await wait_ready(clos.console_logs("leaf3"), offsets, REBOOT_TIMEOUT)
    figure("leaf3 ready after kill -9", f"{ready['leaf3'] - started:.1f} s")

    after = clos.running_pids()
    assert after["leaf3"] == status["leaf3"]["pid"]
    assert {n: p for n, p in after.items() if n != "leaf3"} == {
        n: p for n, p in before.items() if n != "leaf3"
    }, f"a peer was touched: before {before}, after {after}"
    assert_same_machine(clos, "leaf3", argv_before, after["leaf3"])

    async with clos.consoles("leaf3", *SPINES) as consoles:
        converged = await wait_lldp(consoles)
        figure("leaf3 LLDP back after its ready line", f"{converged:.1f} s")


@pytest.mark.timeout(600)
async def test_new_qlinkd_adopts_every_vm(clos: ClosLab) -> None:
    before = clos.running_pids()
    argv_before = {node: cmdline_of(pid) for node, pid in before.items()}

    clos.daemon.kill(signal.SIGKILL)
    for node, pid in before.items():
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, f"{node} died with qlinkd"
    assert clos.pidfile_pids() == before

    clos.daemon = Qlinkd(clos.root, DAEMON_ARGS)
    clos.daemon.start()
    ready_at = time.monotonic()
    status = await clos.wait_status(
        lambda s: (
            {n: (r["state"], r["pid"]) for n, r in s.items()}
            == {n: ("running", pid) for n, pid in before.items()}
        ),
        timeout=ADOPT_WITHIN,
        what="every VM adopted, running, same PID",
    )
    figure("new qlinkd: all six running after its READY", f"{time.monotonic() - ready_at:.1f} s")
    assert all(row["restarts"] == 0 for row in status.values()), status
    assert sorted(e["node"] for e in clos.daemon_events("vm_adopted")) == sorted(NODES)
    assert not clos.daemon_events("qemu_spawned"), "the new qlinkd started a QEMU"
    assert {node: cmdline_of(pid) for node, pid in before.items()} == argv_before

    offsets = log_sizes(clos.console_logs("leaf2"))
    started = time.monotonic()
    output = await asyncio.to_thread(clos.daemon.ctl_ok, "restart", "leaf2", timeout=180)
    figure("restart leaf2 (adopted) command", f"{time.monotonic() - started:.1f} s")
    after = clos.running_pids()
    assert after["leaf2"] != before["leaf2"], output
    assert {n: p for n, p in after.items() if n != "leaf2"} == {
        n: p for n, p in before.items() if n != "leaf2"
    }, f"a peer was touched: before {before}, after {after}"
    assert_same_machine(clos, "leaf2", argv_before["leaf2"], after["leaf2"])
    ready = await wait_ready(clos.console_logs("leaf2"), offsets, REBOOT_TIMEOUT)
    figure("restart leaf2 to its new ready line", f"{ready['leaf2'] - started:.1f} s")
