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
import os
import re
import signal
import time

import psutil
import pytest

from tests.conftest import Qlinkd, cmdline_of
from tests.guest.clos import (
    DAEMON_ARGS,
    LEAVES,
    LINKS,
    NODES,
    REBOOT_TIMEOUT,
    SPINES,
    ClosLab,
    assert_same_machine,
    wait_lldp,
)
from tests.guest.harness import log_sizes, wait_ready

pytestmark = [pytest.mark.guest]

ADOPT_WITHIN = 10.0  # a new qlinkd reports every VM running this soon after READY
PING_INTERVAL = 0.2
# Up to 10 minutes of pings; the test interrupts it once spine1 is back, whatever that took.
PING_COUNT = 3000


def peer_addresses() -> dict[str, list[str]]:
    """{node: the address of the far end of each of its links}."""
    peers: dict[str, list[str]] = {node: [] for node in NODES}
    for link in LINKS:
        (a_node, _, a_ip), (b_node, _, b_ip) = link.ends
        peers[a_node].append(b_ip)
        peers[b_node].append(a_ip)
    return peers


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
        clos.figure("LLDP converged (checked after the pings)", f"{converged:.1f} s")


@pytest.mark.timeout(600)
async def test_restart_spine1_touches_nobody_else(clos: ClosLab) -> None:
    ping_command = f"ping -i {PING_INTERVAL} -c {PING_COUNT} 10.2.1.0"

    # Another process taking one of the lab's ports while spine1 restarts would keep spine1
    # from coming back: if the ping loses packets, the failure says whether one was around.
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
    clos.figure(
        "restart spine1 command", f"{restarted - started:.1f} s (old QEMU stopped by {how})"
    )
    clos.figure("restart spine1 to its new ready line", f"{ready['spine1'] - started:.1f} s")

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
        clos.figure("spine1 LLDP back after its ready line", f"{converged:.1f} s")
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
    clos.figure(
        "ping leaf1 -> spine2 during the restart",
        f"{len(lost)} lost of {sent - 1} (the last request, in flight at the interrupt, "
        f"{'was answered' if sent - 1 in replied else 'is not counted'})",
    )
    assert not lost, (
        f"lost seq {lost}; foreign holders of the lab's ports meanwhile: {intruders or 'none'}\n"
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
    clos.figure("leaf3 running again after kill -9", f"{time.monotonic() - started:.1f} s")
    assert status["leaf3"]["restarts"] == restarts_before + 1, status["leaf3"]
    assert "SIGKILL" in (status["leaf3"]["last_exit"] or ""), status["leaf3"]
    ready = await wait_ready(clos.console_logs("leaf3"), offsets, REBOOT_TIMEOUT)
    clos.figure("leaf3 ready after kill -9", f"{ready['leaf3'] - started:.1f} s")

    after = clos.running_pids()
    assert after["leaf3"] == status["leaf3"]["pid"]
    assert {n: p for n, p in after.items() if n != "leaf3"} == {
        n: p for n, p in before.items() if n != "leaf3"
    }, f"a peer was touched: before {before}, after {after}"
    assert_same_machine(clos, "leaf3", argv_before, after["leaf3"])

    async with clos.consoles("leaf3", *SPINES) as consoles:
        converged = await wait_lldp(consoles)
        clos.figure("leaf3 LLDP back after its ready line", f"{converged:.1f} s")


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
    clos.figure(
        "new qlinkd: all six running after its READY", f"{time.monotonic() - ready_at:.1f} s"
    )
    assert all(row["restarts"] == 0 for row in status.values()), status
    assert sorted(e["node"] for e in clos.daemon_events("vm_adopted")) == sorted(NODES)
    assert not clos.daemon_events("qemu_spawned"), "the new qlinkd started a QEMU"
    assert {node: cmdline_of(pid) for node, pid in before.items()} == argv_before

    offsets = log_sizes(clos.console_logs("leaf2"))
    started = time.monotonic()
    output = await asyncio.to_thread(clos.daemon.ctl_ok, "restart", "leaf2", timeout=180)
    clos.figure("restart leaf2 (adopted) command", f"{time.monotonic() - started:.1f} s")
    after = clos.running_pids()
    assert after["leaf2"] != before["leaf2"], output
    assert {n: p for n, p in after.items() if n != "leaf2"} == {
        n: p for n, p in before.items() if n != "leaf2"
    }, f"a peer was touched: before {before}, after {after}"
    assert_same_machine(clos, "leaf2", argv_before["leaf2"], after["leaf2"])
    ready = await wait_ready(clos.console_logs("leaf2"), offsets, REBOOT_TIMEOUT)
    clos.figure("restart leaf2 to its new ready line", f"{ready['leaf2'] - started:.1f} s")
