"""Test helpers for real guests: the serial-console tools live in `labdriver.serial`; here are
the ones only tests need (QEMU processes under a root, who else holds a lab's ports)."""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from pathlib import Path

import psutil

from labdriver.serial import (
    ConsoleError,
    GuestConsole,
    close_consoles,
    lldp_neighbors,
    log_sizes,
    open_consoles,
    parse_lldp_neighbors,
    wait_ready,
)

__all__ = [
    "ConsoleError",
    "GuestConsole",
    "close_consoles",
    "foreign_holders_of_ports",
    "kill_qemu_under",
    "lldp_neighbors",
    "log_sizes",
    "open_consoles",
    "parse_lldp_neighbors",
    "qemu_under",
    "wait_ready",
]


# --- the daemon and its QEMU processes ---------------------------------------------------


def qemu_under(root: Path) -> list[psutil.Process]:
    """Live QEMU processes whose command line names `root` (zombies count as gone)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if cmdline and "qemu-system" in cmdline[0] and any(str(root) in arg for arg in cmdline):
            found.append(process)
    return found


def kill_qemu_under(root: Path) -> list[int]:
    """SIGKILL, by PID, every QEMU left under `root`; returns their PIDs."""
    leftovers = qemu_under(root)
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(leftovers, timeout=10)
    return [process.pid for process in leftovers]


def foreign_holders_of_ports(ports: Collection[int], root: Path) -> dict[int, str]:
    """Processes not started under `root` that hold one of the UDP `ports`, as the kernel
    says (one walk of the host's sockets). qlink binds a link's port without SO_REUSEADDR,
    so nobody can share it while its VM runs; one that takes it while the VM restarts makes
    the restart fail, and a test that loses packets says who was there.
    Returns {pid: "the ports it binds, and what it is"}.
    """
    held: dict[int, set[int]] = {}
    for connection in psutil.net_connections(kind="udp"):
        if connection.laddr and connection.laddr.port in ports and connection.pid:
            held.setdefault(connection.pid, set()).add(connection.laddr.port)
    found = {}
    for pid, bound in held.items():
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue  # gone since
        if any(str(root) in arg for arg in cmdline):
            continue  # the lab's own QEMU, or its qlinkd opening a socket for one
        what = " ".join(cmdline[:1] + [arg for arg in cmdline if arg.endswith(".pid")])
        found[pid] = f"binds UDP {sorted(bound)} ({what or '?'})"
    return found
