"""Who holds a local port. qlink binds each link's UDP socket itself, without SO_REUSEADDR
(`runtime/links.py`), so a held port fails the launch; these checks come first, before
anything starts, and name the holder when they refuse."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass

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


def ports_in_use() -> BusyPorts:
    """Local UDP and TCP ports bound on this host now, for allocations to avoid.

    One pass over the host's sockets: psutil walks every process's descriptors for it.
    """
    udp: set[int] = set()
    tcp: set[int] = set()
    try:
        for connection in psutil.net_connections(kind="inet"):
            if connection.laddr:
                (udp if connection.type == socket.SOCK_DGRAM else tcp).add(connection.laddr.port)
    except (psutil.AccessDenied, OSError):
        pass
    return BusyPorts(frozenset(udp), frozenset(tcp))


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
