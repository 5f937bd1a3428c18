"""Who holds a local port. qlink binds each link's UDP socket itself, without SO_REUSEADDR
(`runtime/links.py`), so a held port fails the launch; these checks come first, before
anything starts, and name the holder when they refuse."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from qlink.errors import HostError, PortInUseError


def udp_port_holder(port: int) -> str | None:
    """Who holds a UDP port, as `pid 123 (name)`, if the kernel will tell."""
    with contextlib.suppress(psutil.AccessDenied, OSError):
        for connection in psutil.net_connections(kind="udp"):
            if connection.laddr and connection.laddr.port == port and connection.pid:
                with contextlib.suppress(psutil.Error):
                    return f"pid {connection.pid} ({psutil.Process(connection.pid).name()})"
                return f"pid {connection.pid}"
    return None


@dataclass(frozen=True, slots=True)
class BusyPorts:
    udp: frozenset[int]
    tcp: frozenset[int]


def ports_in_use(tcp: bool = True, net: Path = Path("/proc/net")) -> BusyPorts:
    """Local UDP ports, and with `tcp` TCP ports, bound on this host now (in this network
    namespace), for allocations to avoid.

    Read from the kernel's socket tables, as psutil reads them too; but psutil's
    `net_connections` also walks every descriptor of every process to name each socket's
    owner, which allocation does not need. The TCP tables are the slow part (6.6 ms here:
    the kernel walks every bucket of its connection hash), so a lab that allocates no TCP
    port skips them. The format is the kernel's ABI: `local_address` is `HEXADDR:HEXPORT`.
    """
    udp = _table_ports(net, ("udp", "udp6"))
    return BusyPorts(udp=udp, tcp=_table_ports(net, ("tcp", "tcp6")) if tcp else frozenset())


def _table_ports(net: Path, tables: Sequence[str]) -> frozenset[int]:
    ports: set[int] = set()
    for table in tables:
        try:
            lines = (net / table).read_text().splitlines()[1:]  # after the header
        except OSError:
            # No IPv6 in this kernel, or no /proc: the bind probes before a launch
            # (`check_udp_ports_free`) still refuse a port that is taken.
            continue
        for line in lines:
            fields = line.split(maxsplit=2)
            if len(fields) > 1:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return frozenset(ports)


def udp_port_in_use(address: str, port: int) -> bool:
    """Whether someone holds the port: a bind without SO_REUSEADDR fails on any port in use,
    whoever holds it and however (QEMU's own `-netdev socket,udp=` binds with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise HostError(f"cannot bind UDP {address}:{port}: {error}") from error
            return True
    return False


def check_udp_ports_free(address: str, ports: Sequence[int]) -> None:
    """Refuse a port someone else holds, naming who holds it."""
    for port in ports:
        if udp_port_in_use(address, port):
            raise PortInUseError(port, address, udp_port_holder(port))


def check_tcp_port_free(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError as error:
            raise HostError(f"TCP {address}:{port} (management SSH) is in use: {error}") from error
