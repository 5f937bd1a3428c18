"""Operating a live lab, seen from inside real guests: a cut cable, carrier that follows the
peer, a capture of LLDP from both ends of a link, and ssh through the management NIC."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from labdriver.serial import GuestConsole, lldp_neighbors, log_sizes, wait_ready
from tests.conftest import GuestFiles, Qlinkd, write_lab

pytestmark = pytest.mark.guest

StartDaemon = Callable[..., Qlinkd]


def pair_lab(root: Path, guest: GuestFiles) -> Path:
    return write_lab(
        root,
        f"""\
        name: pair
        defaults:
          memory: 256
          kernel: {guest.kernel}
          initrd: {guest.initrd}
          ready: {{console: "qlink-ready name="}}
        nodes:
          r1: {{append: "console=ttyS0 qlink.name=r1 qlink.addr=eth1=10.0.12.0/31"}}
          r2: {{append: "console=ttyS0 qlink.name=r2 qlink.addr=eth1=10.0.12.1/31", mgmt: true}}
        links:
          - [r1:eth1, r2:eth1]
        """,
        name="pair.yaml",
    )


def node_paths(root: Path, node: str) -> tuple[Path, Path]:
    return (
        root / "lib" / "labs" / "pair" / "nodes" / node / "console.log",
        root / "run" / "pair" / node / "console.sock",
    )


async def carrier(console: GuestConsole) -> str:
    return (await console.run("cat /sys/class/net/eth1/carrier")).strip()


async def until(console: GuestConsole, command: str, expected: str, timeout: float) -> float:
    """Seconds until `command` prints `expected` in the guest (re-run per answer)."""
    started = time.monotonic()
    while (await console.run(command, check=False)).strip() != expected:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{console.name}: `{command}` never gave {expected!r}")
    return time.monotonic() - started


def ssh_until_ok(daemon: Qlinkd, node: str, command: str, timeout: float) -> tuple[str, float]:
    """`qlinkctl ssh NODE -- COMMAND`, again while the guest's SSH server is not up yet."""
    started = time.monotonic()
    while True:
        result = daemon.ctl("ssh", node, "--", command, timeout=60)
        if result.returncode == 0:
            return result.stdout, time.monotonic() - started
        # 255 is ssh's own failure (refused, reset while user networking comes up).
        assert result.returncode == 255, result.stdout + result.stderr
        if time.monotonic() - started > timeout:
            raise AssertionError(f"ssh {node} never worked: {result.stderr.strip()}")
        time.sleep(0.5)


def assert_ssh_reaches_r2(daemon: Qlinkd) -> str:
    """ssh through r2's management NIC, with the key qlinkd handed to the guest; r1 has no
    management NIC, and says so. Returns r2's SSH address."""
    ssh_address: str = daemon.status()["pair/r2"]["ssh"]
    assert ssh_address.startswith("127.0.0.1:")
    output, waited = ssh_until_ok(daemon, "r2", "hostname; cat /sys/class/net/eth1/carrier", 60)
    assert output.split() == ["r2", "1"]
    print(f"ssh r2 worked after {waited:.2f} s of tries")
    refused = daemon.ctl("ssh", "r1", "--", "true")
    assert refused.returncode == 2
    assert "r1 has no management NIC" in refused.stderr
    return ssh_address


async def assert_a_guest_reboot_keeps_its_qemu(daemon: Qlinkd, r2: GuestConsole) -> None:
    """The guest's own reboot is not a crash: same QEMU, readiness lost and found again."""
    before = daemon.status()["pair/r2"]
    with daemon.events() as events:
        await r2.type_line("reboot -f")
        # Hang up: the waits below block this loop, and a console client that does not read
        # stalls the guest's UART (QEMU writes the log whether or not anyone is attached).
        await r2.close()
        events.until(lambda e: e.get("node") == "r2" and e.get("ready") is False, 60)
        back = events.until(lambda e: e.get("node") == "r2" and e.get("ready") is True, 300)
    after = daemon.status()["pair/r2"]
    assert back["pid"] == before["pid"] == after["pid"]
    assert after["restarts"] == before["restarts"]
    assert after["state"] == "running"


def lldp_sources(pcap: bytes) -> dict[str, int]:
    """Source MAC → number of LLDP frames (ethertype 0x88cc) in a pcap file."""
    counts: dict[str, int] = {}
    offset = 24
    while offset + 16 <= len(pcap):
        captured = struct.unpack_from("<I", pcap, offset + 8)[0]
        frame = pcap[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        if frame[12:14] == b"\x88\xcc":
            source = frame[6:12].hex(":")
            counts[source] = counts.get(source, 0) + 1
    return counts


async def test_cut_cable_carrier_and_capture(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd("--powerdown-timeout", "10")
    # --wait: until every guest printed its `ready:` line (qlink-ready), seen in its console.
    daemon.ctl_ok("up", str(pair_lab(short_root, guest_files)), "--wait", "--timeout", "300")
    rows = [daemon.status()[node] for node in ("pair/r1", "pair/r2")]
    assert [(row["ready"], 0 < row["time_to_ready"] < 300) for row in rows] == [(True, True)] * 2
    logs = {node: node_paths(short_root, node)[0] for node in ("r1", "r2")}
    r1 = await GuestConsole.connect("r1", node_paths(short_root, "r1")[1])
    r2 = await GuestConsole.connect("r2", node_paths(short_root, "r2")[1])
    try:
        await r1.run("ping -c 2 -W 2 10.0.12.1")
        assert await carrier(r1) == "1"

        ssh_address = assert_ssh_reaches_r2(daemon)

        # A capture while LLDP flows holds frames from both ends of the link.
        pcap_path = short_root / "eth1.pcap"
        daemon.ctl_ok("capture", "r1:eth1", "-w", str(pcap_path), "--seconds", "4")
        links = json.loads(daemon.ctl_ok("links", "-o", "json"))
        macs = {links[0]["a"]["mac"], links[0]["b"]["mac"]}
        sources = lldp_sources(pcap_path.read_bytes())
        assert set(sources) == macs, sources

        # Cut the cable: both guests lose carrier, LLDP expires, ping fails.
        started = time.monotonic()
        daemon.ctl_ok("link", "down", "r1:eth1")
        command_seconds = time.monotonic() - started
        seen_after = await until(r1, "cat /sys/class/net/eth1/carrier", "0", 10)
        assert await carrier(r2) == "0"
        print(f"link down: qlinkctl {command_seconds:.2f} s, guest carrier 0 "
              f"{seen_after:.2f} s after it returned")  # fmt: skip
        await until(r1, "lldpcli show neighbors -f keyvalue | grep -c chassis.name", "0", 30)
        status, _ = await r1.run_rc("ping -c 2 -W 1 10.0.12.1")
        assert status != 0

        daemon.ctl_ok("link", "up", "r1:eth1")
        await until(r1, "cat /sys/class/net/eth1/carrier", "1", 10)
        assert await carrier(r2) == "1"
        await until(r1, "lldpcli show neighbors -f keyvalue | grep -c chassis.name", "1", 30)
        assert (await lldp_neighbors(r1))["eth1"] == ("r2", "eth1")
        await r1.run("ping -c 2 -W 2 10.0.12.1")

        # Restarting r2 takes r1's port down for the restart, and up again after.
        await r2.close()
        offsets = log_sizes({"r2": logs["r2"]})
        daemon.ctl_ok("stop", "r2")
        await until(r1, "cat /sys/class/net/eth1/carrier", "0", 10)
        daemon.ctl_ok("start", "r2")
        await until(r1, "cat /sys/class/net/eth1/carrier", "1", 10)
        daemon.ctl_ok("wait", "r2", "--timeout", "300")
        await wait_ready({"r2": logs["r2"]}, offsets, timeout=300)
        r2 = await GuestConsole.connect("r2", node_paths(short_root, "r2")[1])
        await r2.run("ping -c 2 -W 2 10.0.12.0")

        # The new r2 keeps its SSH port, and the key still opens it.
        assert daemon.status()["pair/r2"]["ssh"] == ssh_address
        output, _ = ssh_until_ok(daemon, "r2", "cat /proc/uptime", 60)
        assert float(output.split()[0]) < 120

        await assert_a_guest_reboot_keeps_its_qemu(daemon, r2)
    finally:
        await r1.close()
        await r2.close()
