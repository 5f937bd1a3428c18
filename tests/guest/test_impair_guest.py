"""Impaired cables between real guests (issue 14): rate measured by a bulk TCP transfer,
delay and loss by ping (where the kernel has netem), LLDP and capture through it all, live
changes, a VM restart and a qlinkd killed with SIGKILL; and nothing of qlink's left in tc.

Two guests, two cables: r1:eth1 <-> r2:eth1 is impaired, r1:eth2 <-> r2:eth2 is the control.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from labdriver.serial import GuestConsole, lldp_neighbors, log_sizes, wait_ready
from qlink.plan.qdisc import ROOT
from tests.conftest import GuestFiles, Qlinkd, console_paths, write_lab
from tests.guest.test_operate_guest import lldp_sources
from tests.test_impair_tc import netem_available

pytestmark = pytest.mark.guest

StartDaemon = Callable[..., Qlinkd]

RATE_WINDOW = 4  # seconds of a transfer counted at the receiver
RATE_TOLERANCE = 0.10  # of the configured rate, on the frames the receiver counts
FRAME_SHARE = 1514 / 1542  # an Ethernet frame's bytes in the IP packet HTB counts (UDP, IP)
DELAY_TOLERANCE_MS = 6.0  # TCG guests answer pings in ~1-3 ms, with outliers
LOSS_PINGS = 1000
_ports = itertools.count(5001)


def impair_lab(root: Path, guest: GuestFiles) -> Path:
    addresses = "eth1=10.0.12.{n}/31,eth2=10.0.22.{n}/31"
    return write_lab(
        root,
        f"""\
        name: imp
        defaults:
          memory: 256
          kernel: {guest.kernel}
          initrd: {guest.initrd}
          ready: {{console: "qlink-ready name="}}
        nodes:
          r1: {{append: "console=ttyS0 qlink.name=r1 qlink.addr={addresses.format(n=0)}"}}
          r2: {{append: "console=ttyS0 qlink.name=r2 qlink.addr={addresses.format(n=1)}"}}
        links:
          - endpoints: [r1:eth1, r2:eth1]
            impair:
              a_to_b: {{rate: 4mbit}}
          - [r1:eth2, r2:eth2]
        """,
        name="imp.yaml",
    )


def paths(root: Path, node: str) -> tuple[Path, Path]:
    return console_paths(root, "imp", node)


def qlink_tc() -> str:
    """What `lo` holds of qlink's: its root qdisc, classes, filters (empty: nothing)."""
    qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    if ROOT not in qdiscs:
        return ""
    more = [
        subprocess.run(["tc", *what, "show", "dev", "lo", "parent", ROOT],
                       capture_output=True, text=True, check=True).stdout
        for what in (("class",), ("filter",))
    ]  # fmt: skip
    return "\n".join([qdiscs, *more])


def classes(text: str) -> dict[int, str]:
    """{port: rate} of qlink's classes in `qlink_tc()`."""
    found = re.findall(rf"class htb {ROOT}([0-9a-f]+) .*? rate (\S+)", text)
    return {int(minor, 16): rate for minor, rate in found}


async def received_rate(sender: GuestConsole, receiver: GuestConsole, link: int) -> float:
    """Bits per second of Ethernet frames `receiver` takes in on eth{link} during a bulk TCP
    transfer from `sender` (busybox nc), over RATE_WINDOW seconds after a second's start."""
    address = f"10.0.{link}2.{1 if receiver.name == 'r2' else 0}"
    port = next(_ports)
    # busybox nc ends when its stdin does, listening too: a sleep holds the listener's open.
    await receiver.run(f"(sleep 120 | nc -l -p {port} > /dev/null &)")
    await sender.run(f"(dd if=/dev/zero bs=1024 count=1000000 2>/dev/null | nc {address} {port} &)")
    try:
        counted = await receiver.run(
            f"f=/sys/class/net/eth{link}/statistics/rx_bytes; sleep 1; a=$(cat $f); "
            f"sleep {RATE_WINDOW}; b=$(cat $f); echo $((b - a))",
            timeout=RATE_WINDOW + 30,
        )
    finally:
        await sender.run("killall nc dd", check=False)
        await receiver.run("killall nc sleep", check=False)
    return int(counted.strip()) * 8 / RATE_WINDOW


def assert_rate(measured: float, configured: float, what: str) -> None:
    expected = configured * FRAME_SHARE
    print(f"FIGURE {what}: {measured / 1e6:.3f} Mbit/s of frames, configured "
          f"{configured / 1e6:g} Mbit/s ({expected / 1e6:.3f} of frames)")  # fmt: skip
    assert abs(measured - expected) <= RATE_TOLERANCE * expected, (what, measured, expected)


@contextlib.asynccontextmanager
async def consoles(root: Path) -> AsyncIterator[tuple[GuestConsole, GuestConsole]]:
    r1 = await GuestConsole.connect("r1", paths(root, "r1")[1])
    try:
        r2 = await GuestConsole.connect("r2", paths(root, "r2")[1])
        try:
            yield r1, r2
        finally:
            await r2.close()
    finally:
        await r1.close()


async def lldp_both_ways(r1: GuestConsole, r2: GuestConsole) -> None:
    for console, peer in ((r1, "r2"), (r2, "r1")):
        for _ in range(60):
            neighbors = await lldp_neighbors(console)
            if neighbors.get("eth1") == (peer, "eth1"):
                break
            await asyncio.sleep(0.5)  # lldpd sends every second
        else:
            raise AssertionError(f"{console.name} never saw {peer} on eth1 over LLDP")


async def test_rate_limit_live_changes_and_nothing_left(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    assert qlink_tc() == "", f"qlink's qdisc is on lo before the test:\n{qlink_tc()}"
    daemon = qlinkd("--powerdown-timeout", "10")
    daemon.ctl_ok("up", str(impair_lab(short_root, guest_files)), "--wait", "--timeout", "300")
    links = {row["link"]: row for row in json.loads(daemon.ctl_ok("links", "-o", "json"))}
    impaired = links["r1:eth1--r2:eth1"]
    assert impaired["impair"] == {"a_to_b": {"rate": "4mbit"}, "b_to_a": None}
    assert links["r1:eth2--r2:eth2"]["impair"] is None
    r1_port = impaired["a"]["port"]
    assert classes(qlink_tc()) == {r1_port: "4Mbit"}

    async with consoles(short_root) as (r1, r2):
        await lldp_both_ways(r1, r2)
        assert_rate(await received_rate(r1, r2, 1), 4e6, "r1->r2 on the impaired cable")
        control = await received_rate(r1, r2, 2)
        back = await received_rate(r2, r1, 1)
        print(f"FIGURE unimpaired: r1->r2 on the other cable {control / 1e6:.1f} Mbit/s, "
              f"r2->r1 on the impaired one {back / 1e6:.1f} Mbit/s")  # fmt: skip
        assert control > 2 * 4e6, control
        assert back > 2 * 4e6, back

        # Live: another rate, the other way (r2's end sends it), no restart.
        pids = {key: row["pid"] for key, row in daemon.status().items()}
        with daemon.events() as events:
            daemon.ctl_ok("link", "set", "r2:eth1", "--rate", "1mbit", "--direction", "in")
            event = events.until(lambda e: e["event"] == "impair", 10)
        assert event["impair"] == {"a_to_b": {"rate": "1mbit"}, "b_to_a": None}
        assert event["source"] == "live"
        assert_rate(await received_rate(r1, r2, 1), 1e6, "r1->r2 after link set --rate 1mbit")
        pcap = short_root / "eth1.pcap"
        daemon.ctl_ok("capture", "r2:eth1", "-w", str(pcap), "--seconds", "3")
        # Both ends' LLDP, through the impaired cable (the capture is QEMU's, above tc).
        assert set(lldp_sources(pcap.read_bytes())) == {impaired["a"]["mac"], impaired["b"]["mac"]}
        assert {key: row["pid"] for key, row in daemon.status().items()} == pids

    # The impairment outlives a restart of the VM that sends through it...
    offsets = log_sizes({"r1": paths(short_root, "r1")[0]})
    daemon.ctl_ok("restart", "r1")
    await wait_ready({"r1": paths(short_root, "r1")[0]}, offsets, timeout=300)
    # ... and a qlinkd killed with SIGKILL: the next one adopts it and keeps it.
    daemon.kill()
    daemon = qlinkd("--powerdown-timeout", "10")
    assert classes(qlink_tc()) == {r1_port: "1Mbit"}
    async with consoles(short_root) as (r1, r2):
        assert_rate(await received_rate(r1, r2, 1), 1e6, "r1->r2 after r1 and qlinkd restarted")
        daemon.ctl_ok("link", "set", "r1:eth1", "--clear")
        assert qlink_tc() == "", qlink_tc()
        cleared = await received_rate(r1, r2, 1)
        print(f"FIGURE after --clear: {cleared / 1e6:.1f} Mbit/s")
        assert cleared > 2 * 4e6, cleared
        await lldp_both_ways(r1, r2)

    # Killed again while impairing both ways; the next qlinkd's `down` leaves nothing.
    daemon.ctl_ok("link", "set", "r1:eth2", "--rate", "2mbit")
    assert len(classes(qlink_tc())) == 2
    daemon.kill()
    daemon = qlinkd("--powerdown-timeout", "10")
    daemon.ctl_ok("down", "imp", timeout=120)
    assert qlink_tc() == "", f"qlink left this on lo after down:\n{qlink_tc()}"


def ping_stats(output: str) -> tuple[int, int, float]:
    """(sent, received, average RTT in ms) from busybox ping's summary."""
    sent, received = map(int, re.findall(r"(\d+) packets transmitted, (\d+) packets received",
                                         output)[0])  # fmt: skip
    average = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", output)
    return sent, received, float(average.group(1)) if average else float("nan")


async def test_delay_and_loss_by_ping(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    """RTT rises by the delay set per direction; loss over 1,000 pings; `--clear` restores."""
    if not netem_available():
        pytest.skip("this kernel has no netem (CONFIG_NET_SCH_NETEM): delay and loss cannot "
                    "be applied here; the rate test covers the classification")  # fmt: skip
    daemon = qlinkd("--powerdown-timeout", "10")
    daemon.ctl_ok("up", str(impair_lab(short_root, guest_files)), "--wait", "--timeout", "300")
    async with consoles(short_root) as (r1, r2):

        async def rtt(link: int) -> float:
            output = await r1.run(f"ping -c 20 -i 0.1 -W 2 10.0.{link}2.1", timeout=60)
            return ping_stats(output)[2]

        base = {link: await rtt(link) for link in (1, 2)}
        daemon.ctl_ok("link", "set", "r1:eth1", "--delay", "20ms", "--direction", "out")
        one_way = {link: await rtt(link) for link in (1, 2)}
        daemon.ctl_ok("link", "set", "r1:eth1", "--delay", "20ms")
        both = {link: await rtt(link) for link in (1, 2)}
        print(f"FIGURE RTT ms: before {base}, 20ms one way {one_way}, 20ms both ways {both}")
        assert abs(one_way[1] - base[1] - 20) <= DELAY_TOLERANCE_MS
        assert abs(both[1] - base[1] - 40) <= DELAY_TOLERANCE_MS
        assert abs(both[2] - base[2]) <= DELAY_TOLERANCE_MS  # the other cable: unchanged

        daemon.ctl_ok("link", "set", "r1:eth1", "--loss", "10%", "--direction", "out")
        output = await r1.run(f"ping -c {LOSS_PINGS} -i 0.01 -W 2 -q 10.0.12.1", timeout=120,
                              check=False)  # fmt: skip
        sent, received, _ = ping_stats(output)
        lost = 100 * (sent - received) / sent
        print(f"FIGURE loss: {lost:.1f}% of {sent} pings, configured 10%")
        # Binomial, n=1000, p=0.1: sigma is 0.95 points; 4 sigma either side.
        assert 6.2 <= lost <= 13.8, lost
        await lldp_both_ways(r1, r2)

        daemon.ctl_ok("link", "set", "r1:eth1", "--clear")
        restored = await rtt(1)
        print(f"FIGURE RTT after --clear: {restored} ms (before {base[1]} ms)")
        assert abs(restored - base[1]) <= DELAY_TOLERANCE_MS
    daemon.ctl_ok("down", "imp", timeout=120)
    assert qlink_tc() == ""
