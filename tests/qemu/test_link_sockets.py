"""A stranger cannot speak on a cable (issue #15): real QEMU 7.2, paused with -S.

r1 runs in QEMU from its plan; this test plays r2, its peer, through the very socket r2's
QEMU would get. A paused VM's NIC takes no frame, so QEMU stops reading its socket after the
first datagram and the rest wait in the socket's receive queue: what reaches QEMU's socket is
measured there (`/proc/net/udp`), with the peer's own datagrams as the proof that it would
show. Under `-netdev socket,udp=` the stranger's 1,001 datagrams sat in that queue, the empty
one among them, which stops the netdev for good once read; here the kernel refuses them.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from qlink.plan.argv import HostFacts, build_argv
from qlink.plan.lab import NodePlan, plan_lab
from qlink.plan.paths import Layout
from qlink.runtime.links import LinkSocket, open_link_socket
from qlink.runtime.ports import ports_in_use
from qlink.runtime.process import launch
from qlink.topology import parse_topology_text
from tests.conftest import GuestFiles

pytestmark = pytest.mark.qemu

FLOOD = 1000


@dataclass(frozen=True)
class UdpSocketRow:
    """One socket's line of /proc/net/udp."""

    rx_queue: int
    drops: int


def udp_row(inode: int) -> UdpSocketRow:
    with open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[9]) == inode:
                return UdpSocketRow(int(fields[4].split(":")[1], 16), int(fields[12]))
    raise AssertionError(f"no UDP socket with inode {inode}")


def socket_inode(pid: int, fd: int) -> int:
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    assert target.startswith("socket:["), target
    return int(target.removeprefix("socket:[").removesuffix("]"))


def no_ports() -> int:
    """Datagrams the host received for which no socket would take them (`Udp: NoPorts`)."""
    with open("/proc/net/snmp") as snmp:
        udp = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(udp[1][udp[0].index("NoPorts")])


def pair_plan(root: Path, guest: GuestFiles) -> dict[str, NodePlan]:
    lab = parse_topology_text(
        f"""\
name: pair
defaults: {{memory: 64, accel: tcg, kernel: {guest.kernel}}}
nodes: {{r1: {{}}, r2: {{}}}}
links:
  - [r1:eth1, r2:eth1]
""",
        "pair.yaml",
    )
    busy = ports_in_use()
    plan, _ = plan_lab(lab, Layout.under(root), busy_udp=busy.udp, busy_tcp=busy.tcp)
    return plan.nodes


async def until_queued(inode: int, timeout: float = 5.0) -> UdpSocketRow:
    """Until the socket's receive queue holds something (the peer's datagrams arrive through
    loopback's softirq, not always before send() returns). Polled: another process's socket
    queue offers no event to wait on."""
    async with asyncio.timeout(timeout):
        while (row := udp_row(inode)).rx_queue == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return row


async def test_a_strangers_datagrams_never_reach_qemu_and_the_peers_do(
    short_root: Path, qemu_binary: str, guest_files: GuestFiles
) -> None:
    nodes = pair_plan(short_root, guest_files)
    r1, r2 = nodes["r1"], nodes["r2"]
    argv = build_argv(r1, HostFacts(qemu_binary=qemu_binary))
    # Launched without its start hold's release: the CPUs stay stopped (-S), so nothing but
    # QEMU's own backend could take datagrams off the socket.
    links = [LinkSocket.of(nic) for nic in r1.nics]
    process, qmp = await launch(argv, r1.paths, 20, "test", links=links)
    try:
        eth1 = r1.nic("eth1")
        inode = socket_inode(process.pid, eth1.fd)
        (held,) = [
            c for c in psutil.Process(process.pid).net_connections("udp4") if c.fd == eth1.fd
        ]
        assert (tuple(held.laddr), tuple(held.raddr)) == (
            (eth1.local_address, eth1.local_port),
            (eth1.remote_address, eth1.remote_port),
        )
        assert udp_row(inode) == UdpSocketRow(0, 0)
        target = (eth1.local_address, eth1.local_port)
        refused_before = no_ports()
        rng = random.Random(15)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"", target)
            for _ in range(FLOOD):
                stranger.sendto(rng.randbytes(rng.randrange(14, 1515)), target)
            # The last one connected, so that the kernel's answer comes back to it: no socket
            # takes a datagram from here (ICMP port unreachable).
            stranger.connect(target)
            stranger.send(b"")
            stranger.settimeout(5)
            with pytest.raises(ConnectionRefusedError):
                stranger.recv(2048)
        refused = no_ports() - refused_before
        assert udp_row(inode) == UdpSocketRow(0, 0), "a stranger's datagram reached QEMU"
        assert refused >= FLOOD + 2, refused
        print(f"\nFIGURE stranger: {FLOOD + 2} datagrams sent, {refused} refused by the kernel "
              f"(Udp NoPorts, host-wide), 0 queued to QEMU's socket, 0 dropped there")  # fmt: skip

        # The peer's datagrams do arrive: r2's own socket, as r2's QEMU would hold it.
        with open_link_socket(LinkSocket.of(r2.nic("eth1"))) as peer:
            for _ in range(3):
                peer.send(b"\xff" * 6 + bytes.fromhex("020000000002") + b"\x88\xb5" + b"x" * 50)
            row = await until_queued(inode)
        assert row.drops == 0
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
    finally:
        await qmp.execute("quit")
        await process.wait()
        await qmp.close()
