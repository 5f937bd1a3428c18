"""Operating a live CLOS lab (issue #4), seen from inside the guests.

The lab (configs/clos.yaml) comes up once for the module; each test starts from it converged
and leaves it so:

a. `qlinkctl restart spine1`: every leaf's port facing spine1 loses carrier for the restart
   and gets it back, exactly once; the ports facing spine2 never lose it;
b. a live edit: the file gains a leaf5 cabled to spine1 and spine2 on their unused swp5.
   `up --dry-run` says what will change and changes nothing; `up` starts leaf5 and plugs a
   NIC into each running spine (QMP device_add behind a PCI bridge, at the place a restart
   would give it): no other VM restarts, no leaf loses carrier, the spines' guests name the
   new port swp5, and LLDP shows leaf5 on the right spine ports from both sides. The
   original file again stops leaf5 and unplugs swp5 from the spines, still without a
   restart.

Carrier is watched by a loop in each leaf's shell that logs every change with the guest's
uptime, started before and read after, and by the kernel's carrier_down/up counters, which
count every transition however short (the loop only polls). Timings print with `pytest -s`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from tests.conftest import cmdline_of
from tests.guest.clos import (
    CONFIG,
    LEAVES,
    LINKS,
    NODES,
    REBOOT_TIMEOUT,
    SPINES,
    ClosLab,
    Link,
    wait_lldp,
)
from tests.guest.harness import GuestConsole, log_sizes, qemu_under, wait_ready

pytestmark = [pytest.mark.guest]

# Each leaf's uplinks, from the cabling: leafL:swp5S faces spineS.
TOWARD_SPINE1, TOWARD_SPINE2 = "swp51", "swp52"
UPLINKS = (TOWARD_SPINE1, TOWARD_SPINE2)

LEAF5 = "leaf5"
LEAF5_LINKS = [Link(1, 5), Link(2, 5)]  # spine1:swp5 and spine2:swp5, unused so far
# `up` returns once every restarted or new VM runs (its QMP answers), before guests boot.
UP_TIMEOUT = 300.0

CARRIER_LOG = "/tmp/carrier.log"
CARRIER_PID = "/tmp/carrier.pid"
CARRIER_POLL_US = 50_000

T = TypeVar("T")


# --- carrier, recorded inside the leaves --------------------------------------------------


@dataclass(frozen=True)
class CarrierTrace:
    """What a guest's recorder saw: at its start and at every change it noticed, the guest's
    uptime and each port's carrier."""

    samples: list[tuple[float, dict[str, int]]]

    def values(self, port: str) -> list[int]:
        """The successive carrier values of `port`, repeats collapsed: [1, 0, 1] is one flap."""
        values: list[int] = []
        for _, carriers in self.samples:
            if not values or values[-1] != carriers[port]:
                values.append(carriers[port])
        return values

    def all_down_seconds(self, ports: Iterable[str]) -> float:
        """How long every one of `ports` was down at the same time, in total."""
        ports = tuple(ports)
        total = 0.0
        for (at, carriers), (next_at, _) in zip(self.samples, self.samples[1:], strict=False):
            if all(carriers[port] == 0 for port in ports):
                total += next_at - at
        return total


async def start_carrier_recorder(console: GuestConsole, ports: Iterable[str]) -> None:
    """Start, in the background of the guest's shell, a loop that appends `UPTIME C1 C2 ...`
    to CARRIER_LOG whenever the ports' carrier changes; returns once it logged its first line.

    `read` and `[` are shell builtins, so a turn of the loop costs one fork (usleep): cheap
    enough for a TCG guest, and a 50 ms poll sees a carrier loss of a few tenths of a second.
    Shorter flaps are caught by `carrier_counts`, not by this.
    """
    reads = "; ".join(f"read c{i} </sys/class/net/{port}/carrier" for i, port in enumerate(ports))
    now = " ".join(f"$c{i}" for i, _ in enumerate(ports))
    loop = (
        f'prev=; while :; do {reads}; now="{now}"; '
        f'if [ "$now" != "$prev" ]; then read up _ </proc/uptime; '
        f'echo "$up $now" >>{CARRIER_LOG}; prev=$now; fi; usleep {CARRIER_POLL_US}; done'
    )
    # A recorder left behind by a failed test would write into the new log too.
    await console.run(f"[ -s {CARRIER_PID} ] && kill $(cat {CARRIER_PID}); rm -f {CARRIER_LOG}",
                      check=False)  # fmt: skip
    await console.run(f"({loop}) </dev/null >/dev/null 2>&1 & echo $! >{CARRIER_PID}")
    await console.run(f"until [ -s {CARRIER_LOG} ]; do usleep {CARRIER_POLL_US}; done")


async def stop_carrier_recorder(console: GuestConsole, ports: Iterable[str]) -> CarrierTrace:
    """Stop the recorder and read what it logged."""
    await console.run(f"kill $(cat {CARRIER_PID}); rm -f {CARRIER_PID}")
    ports = tuple(ports)
    samples = []
    for line in (await console.run(f"cat {CARRIER_LOG}")).splitlines():
        uptime, *carriers = line.split()
        samples.append((float(uptime), dict(zip(ports, map(int, carriers), strict=True))))
    return CarrierTrace(samples)


async def carrier_counts(console: GuestConsole, ports: Iterable[str]) -> dict[str, list[int]]:
    """{port: [carrier_down_count, carrier_up_count]}: the kernel counts every transition."""
    ports = tuple(ports)
    paths = " ".join(
        f"/sys/class/net/{port}/carrier_down_count /sys/class/net/{port}/carrier_up_count"
        for port in ports
    )
    counts = [int(value) for value in (await console.run(f"cat {paths}")).split()]
    return {port: counts[2 * i : 2 * i + 2] for i, port in enumerate(ports)}


async def on_each(
    consoles: Mapping[str, GuestConsole], step: Callable[[GuestConsole], Awaitable[T]]
) -> dict[str, T]:
    """`step` on every console at once: {node: its result}."""
    results = await asyncio.gather(*(step(console) for console in consoles.values()))
    return dict(zip(consoles, results, strict=True))


@dataclass
class CarrierRecording:
    """The leaves' uplinks over an operation: each leaf's trace and kernel counters."""

    counts_before: dict[str, dict[str, list[int]]]
    counts_after: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    traces: dict[str, CarrierTrace] = field(default_factory=dict)

    def transitions(self, leaf: str, port: str) -> list[int]:
        """[losses, returns] of carrier the kernel counted on `leaf`'s `port`."""
        before, after = self.counts_before[leaf][port], self.counts_after[leaf][port]
        return [after[0] - before[0], after[1] - before[1]]

    def seen(self, leaf: str) -> str:
        """Everything recorded on `leaf`, for a failure message."""
        return (f"{leaf}: trace {self.traces[leaf].samples}, kernel counts "
                f"{self.counts_before[leaf]} -> {self.counts_after[leaf]}")  # fmt: skip


@asynccontextmanager
async def recording_uplinks(leaves: Mapping[str, GuestConsole]) -> AsyncIterator[CarrierRecording]:
    """Record every leaf's uplink carrier for the duration of the block."""
    recording = CarrierRecording(await on_each(leaves, lambda c: carrier_counts(c, UPLINKS)))
    await on_each(leaves, lambda c: start_carrier_recorder(c, UPLINKS))
    yield recording
    recording.traces = await on_each(leaves, lambda c: stop_carrier_recorder(c, UPLINKS))
    recording.counts_after = await on_each(leaves, lambda c: carrier_counts(c, UPLINKS))


# --- processes and plans ------------------------------------------------------------------


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_kept(before: Mapping[str, int], after: Mapping[str, int], nodes: Iterable[str]) -> None:
    kept = {node: (before[node], after[node]) for node in nodes}
    assert all(old == new for old, new in kept.values()), f"(before, after) PIDs: {kept}"


def with_leaf5(directory: Path) -> Path:
    """configs/clos.yaml as an operator edits it: a leaf5 node and its two cables to the
    spines' unused swp5. The spines' own lines stay as they are."""
    text = CONFIG.read_text().rstrip("\n") + "\n"
    assert text.count("\nlinks:\n") == 1, f"{CONFIG}: no single `links:` line to insert before"
    node = f'  {LEAF5}:\n    append: "console=ttyS0 qlink.name={LEAF5} qlink.ifprefix=swp"\n'
    cables = "".join(
        f"  - [{spine}:{spine_port}, {leaf}:{leaf_port}]\n"
        for (spine, spine_port, _), (leaf, leaf_port, _) in (link.ends for link in LEAF5_LINKS)
    )
    path = directory / "clos-with-leaf5.yaml"
    path.write_text(text.replace("\nlinks:\n", f"\n{node}links:\n") + cables)
    return path


_PLAN_LINE = re.compile(r"^  (start|restart|replug|remove) (\S+): (.*)$", re.MULTILINE)


def dry_run(clos: ClosLab, topology: Path) -> dict[str, dict[str, str]]:
    """`qlinkctl up FILE --dry-run` as {verb: {node: why}}, from the plan it prints."""
    output = clos.daemon.ctl_ok("up", str(topology), "--dry-run")
    planned: dict[str, dict[str, str]] = {}
    for verb, node, why in _PLAN_LINE.findall(output):
        planned.setdefault(verb, {})[node] = why
    assert planned, f"no plan lines in:\n{output}"
    return planned


def cabling(clos: ClosLab) -> set[frozenset[str]]:
    """The lab's links as `qlinkctl links` shows them, each as its two endpoints."""
    rows = json.loads(clos.daemon.ctl_ok("links", "-o", "json"))
    return {frozenset((row["a"]["endpoint"], row["b"]["endpoint"])) for row in rows}


def cables_of(links: Iterable[Link]) -> set[frozenset[str]]:
    return {frozenset(f"{node}:{port}" for node, port, _ in link.ends) for link in links}


# --- the tests, in order ------------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_spine_restart_drops_carrier_only_on_the_ports_facing_it(clos: ClosLab) -> None:
    async with clos.consoles() as consoles:
        await wait_lldp(consoles)  # the fabric is converged before anything happens
    before = clos.running_pids()

    async with clos.consoles(*LEAVES) as leaves, recording_uplinks(leaves) as recording:
        offsets = log_sizes(clos.console_logs("spine1"))
        started = time.monotonic()
        await asyncio.to_thread(clos.daemon.ctl_ok, "restart", "spine1", timeout=180)
        clos.figure("restart spine1 command", f"{time.monotonic() - started:.1f} s")
        ready = await wait_ready(clos.console_logs("spine1"), offsets, REBOOT_TIMEOUT)
        clos.figure("restart spine1 to its ready line", f"{ready['spine1'] - started:.1f} s")
        # spine1 is back once it and its leaves see each other again.
        async with clos.consoles("spine1") as spine1:
            await wait_lldp({**spine1, **leaves})

    after = clos.running_pids()
    assert after["spine1"] != before["spine1"]
    assert_kept(before, after, [node for node in NODES if node != "spine1"])
    for leaf in LEAVES:
        trace = recording.traces[leaf]
        assert trace.values(TOWARD_SPINE1) == [1, 0, 1], recording.seen(leaf)
        assert trace.values(TOWARD_SPINE2) == [1], recording.seen(leaf)
        # However short, any other loss of carrier would show in the kernel's counts.
        assert recording.transitions(leaf, TOWARD_SPINE1) == [1, 1], recording.seen(leaf)
        assert recording.transitions(leaf, TOWARD_SPINE2) == [0, 0], recording.seen(leaf)
    down = [recording.traces[leaf].all_down_seconds([TOWARD_SPINE1]) for leaf in LEAVES]
    clos.figure(
        "leaf ports toward spine1 without carrier during its restart",
        f"{min(down):.1f}-{max(down):.1f} s (guest clocks, 50 ms poll)",
    )


@pytest.mark.timeout(1200)
async def test_live_edit_adds_then_removes_a_leaf(clos: ClosLab) -> None:
    async with clos.consoles() as consoles:
        await wait_lldp(consoles)
    before = clos.running_pids()
    argv_before = {node: cmdline_of(pid) for node, pid in before.items()}
    edited = with_leaf5(clos.root)

    # The dry run: one node to start; the running spines get a NIC each, no restart.
    planned = await asyncio.to_thread(dry_run, clos, edited)
    assert planned == {
        "start": {LEAF5: "new node"},
        "replug": {
            f"spine{spine}": f"plug swp{spine_port} (to {LEAF5}:swp5{spine})"
            for spine, spine_port in ((link.spine, link.leaf) for link in LEAF5_LINKS)
        },
    }, planned
    assert clos.running_pids() == before, "the dry run changed what runs"
    assert LEAF5 not in clos.status()

    pids_with_leaf5 = await _add_leaf5(clos, edited, before, argv_before)

    # Back to the original file: leaf5 goes, and swp5 is unplugged from the spines.
    planned = await asyncio.to_thread(dry_run, clos, CONFIG)
    assert planned == {
        "remove": {LEAF5: "not in the file any more"},
        "replug": {spine: f"unplug swp5 (to {LEAF5}:swp5{spine[-1]})" for spine in SPINES},
    }, planned
    await _remove_leaf5(clos, pids_with_leaf5, argv_before)


async def spine_ports(consoles: Mapping[str, GuestConsole]) -> dict[str, list[str]]:
    """Each spine guest's swp interfaces."""
    listed = await on_each(consoles, lambda c: c.run("ls /sys/class/net"))
    return {
        node: sorted(n for n in text.split() if n.startswith("swp"))
        for node, text in listed.items()
    }


async def _add_leaf5(
    clos: ClosLab, edited: Path, before: dict[str, int], argv_before: dict[str, list[str]]
) -> dict[str, int]:
    """`up` the edited file; check leaf5 joined the fabric and nobody else was touched.
    Returns the PIDs after, leaf5's included."""
    async with clos.consoles(*LEAVES) as leaves, recording_uplinks(leaves) as recording:
        started = time.monotonic()
        await asyncio.to_thread(clos.daemon.ctl_ok, "up", str(edited), timeout=UP_TIMEOUT)
        clos.figure("up adding leaf5 command", f"{time.monotonic() - started:.1f} s")
        clos.nodes = (*NODES, LEAF5)
        clos.load_plan(edited)
        # leaf5's console log is new: its first ready line counts.
        ready = await wait_ready(clos.console_logs(LEAF5), {LEAF5: 0}, REBOOT_TIMEOUT)
        clos.figure("leaf5 ready after up started", f"{ready[LEAF5] - started:.1f} s")
        async with clos.consoles(*SPINES, LEAF5) as joined:
            spines = {node: joined[node] for node in SPINES}
            assert await spine_ports(spines) == {
                spine: ["swp1", "swp2", "swp3", "swp4", "swp5"] for spine in SPINES
            }
            # The plugged NIC is the planned one: its MAC is the one a restart would give.
            macs = await on_each(spines, lambda c: c.run("cat /sys/class/net/swp5/address"))
            for spine, mac in macs.items():
                assert mac.strip() == clos.planned_mac(spine, "swp5"), (spine, mac)
            converged = await wait_lldp({**joined, **leaves}, [*LINKS, *LEAF5_LINKS])
        clos.figure(
            "LLDP with leaf5 converged",
            f"{time.monotonic() - started:.1f} s after up started, {converged:.1f} s after "
            "leaf5 was ready",
        )

    after = clos.running_pids()
    assert_kept(before, after, NODES)  # the spines too: their new NIC was plugged in
    # One VM more, and it is leaf5.
    running = {process.pid for process in qemu_under(clos.root)}
    assert running == set(after.values()), (running, after)
    assert running - set(before.values()) == {after[LEAF5]}
    for spine in SPINES:
        assert cmdline_of(after[spine]) == argv_before[spine]  # the same QEMU, never relaunched
    assert cabling(clos) == cables_of([*LINKS, *LEAF5_LINKS])
    for leaf in LEAVES:
        for port in UPLINKS:
            assert recording.transitions(leaf, port) == [0, 0], recording.seen(leaf)
    return after


async def _remove_leaf5(
    clos: ClosLab, with_leaf5: dict[str, int], argv_before: dict[str, list[str]]
) -> None:
    """`up` the original file: leaf5 stops, swp5 leaves the running spines."""
    async with clos.consoles(*LEAVES) as leaves, recording_uplinks(leaves) as recording:
        started = time.monotonic()
        await asyncio.to_thread(clos.daemon.ctl_ok, "up", str(CONFIG), timeout=UP_TIMEOUT)
        clos.figure("up removing leaf5 command", f"{time.monotonic() - started:.1f} s")
        clos.nodes = NODES
        clos.load_plan(CONFIG)
    assert LEAF5 not in clos.status()
    after = clos.running_pids()
    assert gone(with_leaf5[LEAF5]), f"leaf5's QEMU (pid {with_leaf5[LEAF5]}) still runs"
    assert {process.pid for process in qemu_under(clos.root)} == set(after.values())
    assert_kept(with_leaf5, after, NODES)
    for spine in SPINES:
        assert cmdline_of(after[spine]) == argv_before[spine]
    assert cabling(clos) == cables_of(LINKS)
    for leaf in LEAVES:
        for port in UPLINKS:
            assert recording.transitions(leaf, port) == [0, 0], recording.seen(leaf)

    async with clos.consoles() as consoles:
        assert await spine_ports({spine: consoles[spine] for spine in SPINES}) == {
            spine: ["swp1", "swp2", "swp3", "swp4"] for spine in SPINES
        }
        converged = await wait_lldp(consoles)
    clos.figure("LLDP back to the original cabling", f"{converged:.1f} s after up returned")
