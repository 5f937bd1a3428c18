"""Operating a live lab, seen from inside real guests: a cut cable, carrier that follows the
peer, a capture of LLDP from both ends of a link, and ssh through the management NIC."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from labdriver.serial import GuestConsole, lldp_neighbors, log_sizes, wait_ready
from tests.conftest import GuestFiles, Qlinkd, console_paths, write_lab

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
    return console_paths(root, "pair", node)


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
        # The waits run in a thread: this loop goes on reading r2's console, since a console
        # client that does not read stalls the guest's UART, and with it the guest's boot.
        lost = await asyncio.to_thread(
            events.until, lambda e: e.get("node") == "r2" and e.get("ready") is False, 60
        )
        back = await asyncio.to_thread(
            events.until, lambda e: e.get("node") == "r2" and e.get("ready") is True, 300
        )
    assert lost["last_event"] == "RESET"
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


STRANGER_FRAMES = 1000


def stranger_sends(port: int, mac: str, rng: random.Random) -> int:
    """From a socket of no NIC: 1,000 random Ethernet frames addressed to the NIC behind
    `port` (so that a guest would count each one it got), then a zero-length datagram, which
    `-netdev socket,udp=` read as the end of the cable. Returns how many the kernel refused
    to any socket (host-wide `Udp: NoPorts`, at least these)."""
    before = udp_no_ports()
    target = ("127.0.0.1", port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        for _ in range(STRANGER_FRAMES):
            header = bytes.fromhex(mac.replace(":", "")) + bytes.fromhex("02dead00beef88b5")
            stranger.sendto(header + rng.randbytes(rng.randrange(46, 1501)), target)
        stranger.connect(target)
        stranger.send(b"")
        # The kernel's answer to the last one (ICMP port unreachable): nothing took it.
        stranger.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            stranger.recv(2048)
    return udp_no_ports() - before


def udp_no_ports() -> int:
    with open("/proc/net/snmp") as snmp:
        udp = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(udp[1][udp[0].index("NoPorts")])


async def counter(console: GuestConsole, name: str) -> int:
    return int(await console.run(f"cat /sys/class/net/eth1/statistics/{name}"))


async def test_a_strangers_datagrams_neither_reach_the_guests_nor_cut_the_cable(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    """Issue #15: any local user could stop a direction of a cable with one empty datagram to
    its port, or put frames on it. Now only the peer's socket can speak on it."""
    daemon = qlinkd("--powerdown-timeout", "10")
    daemon.ctl_ok("up", str(pair_lab(short_root, guest_files)))
    logs = {node: node_paths(short_root, node)[0] for node in ("r1", "r2")}
    await wait_ready(logs, timeout=300)
    (link,) = json.loads(daemon.ctl_ok("links", "-o", "json"))
    ends = {link[side]["endpoint"].split(":")[0]: link[side] for side in "ab"}
    peer_of = {"r1": "r2", "r2": "r1"}
    async with (
        await GuestConsole.connect("r1", node_paths(short_root, "r1")[1]) as r1,
        await GuestConsole.connect("r2", node_paths(short_root, "r2")[1]) as r2,
    ):
        consoles = {"r1": r1, "r2": r2}
        for node, console in consoles.items():
            command = "lldpcli show neighbors -f keyvalue | grep -c chassis.name"
            await until(console, command, "1", 60)
            assert (await lldp_neighbors(console))["eth1"] == (peer_of[node], "eth1")
        # Each guest's received frames against what its peer sent in the same window.
        received = {node: await counter(c, "rx_packets") for node, c in consoles.items()}
        sent = {node: await counter(c, "tx_packets") for node, c in consoles.items()}
        rng = random.Random(15)
        refused = {node: stranger_sends(end["port"], end["mac"], rng) for node, end in ends.items()}
        # New frames must cross both ways for these (echo requests and replies), for 5 s:
        # longer than LLDP's 4 s TTL, so a dead direction would have let a neighbour expire.
        await r1.run("ping -c 6 -i 1 -W 2 10.0.12.1")
        await r2.run("ping -c 2 -W 2 10.0.12.0")
        for node, console in consoles.items():
            assert (await lldp_neighbors(console))["eth1"] == (peer_of[node], "eth1")
        received = {node: await counter(c, "rx_packets") - received[node]
                    for node, c in consoles.items()}  # fmt: skip
        sent = {node: await counter(c, "tx_packets") - sent[node] for node, c in consoles.items()}
    print(f"\nFIGURE stranger datagrams: {STRANGER_FRAMES + 1} to each end's port; refused by "
          f"the kernel {refused}; frames received {received}, sent by the peer "
          f"{ {node: sent[peer_of[node]] for node in sent} }")  # fmt: skip
    for node, got in received.items():
        assert refused[node] >= STRANGER_FRAMES + 1, refused
        # Only what the peer sent (a few frames in flight at the edges of the window).
        assert got <= sent[peer_of[node]] + 5, (node, received, sent)
        assert got < STRANGER_FRAMES, f"{node} received the stranger's frames: {got}"
