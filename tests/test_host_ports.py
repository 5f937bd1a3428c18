"""The ports the host has bound, which new allocations avoid: read from the kernel's socket
tables, TCP only for a lab that allocates TCP ports (management SSH)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlink.daemon.core import Daemon
from qlink.runtime.ports import ports_in_use
from tests.fakes import FakeRuntime
from tests.test_daemon_core import serving, up

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)


def row(local: str, remote: str = "00000000:0000") -> str:
    return (
        f"   0: {local} {remote} 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n"
    )


def test_the_tables_give_every_local_port_ipv4_and_ipv6(tmp_path: Path) -> None:
    (tmp_path / "udp").write_text(HEADER + row("0100007F:4E20") + row("00000000:0044"))
    (tmp_path / "udp6").write_text(
        HEADER + row("00000000000000000000000001000000:4E21", "0" * 32 + ":0000")
    )
    # An outgoing connection binds its local port too: allocation avoids it as well.
    (tmp_path / "tcp").write_text(
        HEADER + row("0100007F:0898") + row("0100007F:A1B2", "0100007F:0016")
    )
    # No tcp6: a kernel without IPv6.
    busy = ports_in_use(net=tmp_path)
    assert busy.udp == {20000, 68, 20001}
    assert busy.tcp == {2200, 41394}
    assert ports_in_use(tcp=False, net=tmp_path).tcp == frozenset()


def test_a_missing_proc_is_no_ports_not_an_error(tmp_path: Path) -> None:
    busy = ports_in_use(net=tmp_path / "absent")
    assert (busy.udp, busy.tcp) == (frozenset(), frozenset())


@pytest.fixture
def held_sockets() -> Iterator[tuple[int, int]]:
    """A UDP and a listening TCP socket on loopback; their ports."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
    ):
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        yield udp.getsockname()[1], tcp.getsockname()[1]


def test_this_hosts_sockets_are_seen(held_sockets: tuple[int, int]) -> None:
    udp_port, tcp_port = held_sockets
    busy = ports_in_use()
    assert udp_port in busy.udp
    assert tcp_port in busy.tcp
    assert udp_port in ports_in_use(tcp=False).udp


MGMT_LAB = """\
name: m
defaults: {kernel: /k}
nodes: {a: {mgmt: true}, b: {}}
links:
  - [a:eth1, b:eth1]
"""


async def test_a_management_ssh_port_avoids_a_tcp_port_the_host_holds(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        try:
            holder.bind(("127.0.0.1", 2200))  # the first port of the SSH pool
            holder.listen()
        except OSError:
            pass  # held already, by someone else: the allocation must avoid it all the same
        async with serving(tmp_path, FakeRuntime()) as daemon:
            done = await up(daemon, MGMT_LAB)
            assert done["failed"] == {}
            assert ssh_port(daemon, "a") not in (None, 2200)


def ssh_port(daemon: Daemon, node: str) -> int | None:
    lab = daemon.labs.get("m")
    assert lab is not None
    mgmt = lab.plan.nodes[node].mgmt
    return mgmt.ssh_port if mgmt is not None else None
