"""Test helpers for real guests: the serial-console tools live in `labdriver.serial`; here are
the ones only tests need (QEMU processes under a root, who else binds a lab's ports)."""

from __future__ import annotations

import contextlib
import re
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
    "foreign_qemu_on_ports",
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


_LOCALADDR_RE = re.compile(r"localaddr=([^,:]+):(\d+)")


def foreign_qemu_on_ports(ports: Collection[int], root: Path) -> dict[int, str]:
    """QEMU processes not started under `root` whose UDP netdevs bind one of `ports`.

    QEMU binds `-netdev socket,udp=` with SO_REUSEADDR, so such a process silently receives
    (steals) frames meant for the lab's VM for as long as it lives: a test that loses packets
    says who was there. Returns {pid: "the ports it binds, under which root"}.
    """
    found = {}
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if not cmdline or "qemu-system" not in cmdline[0]:
            continue
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(root) in arg for arg in cmdline):
            continue
        bound = sorted(
            int(port)
            for arg in cmdline
            for _, port in _LOCALADDR_RE.findall(arg)
            if int(port) in ports
        )
        if bound:
            pidfile = next((arg for arg in cmdline if arg.endswith(".pid")), "?")
            found[process.pid] = f"binds UDP {bound} (pidfile {pidfile})"
    return found
