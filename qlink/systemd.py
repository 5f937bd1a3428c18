"""sd_notify(3): tell systemd (Type=notify) that qlinkd is ready, or stopping."""

from __future__ import annotations

import os
import socket


def notify(*assignments: str) -> bool:
    """Send `READY=1`-style assignments to $NOTIFY_SOCKET; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    # As sd_notify(3) does, a notification that cannot be delivered is dropped: it must never
    # take the daemon down (systemd may be gone while qlinkd shuts down).
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError:
        return False
    return True
