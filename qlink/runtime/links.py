"""A data NIC's end of a cable: the UDP socket qlink opens and hands to QEMU.

Why qlink opens it rather than `-netdev socket,udp=PEER,localaddr=LOCAL` (QEMU 7.2):
- QEMU binds that socket with SO_REUSEADDR and never connect()s it, so it takes datagrams
  from any local process, and a second process can bind the same port and steal frames.
- It reads a zero-length datagram as the end of a connection and stops polling the socket:
  one empty datagram from anyone kills that direction of the cable until the VM restarts,
  while everything qlink can see (QMP, carrier) still says it is up. Any other datagram
  reaches the guest as an Ethernet frame.

So qlink binds the socket itself, without SO_REUSEADDR (a second binder fails, and so does
our bind if someone holds the port: `PortInUseError`), and connect()s it to the peer's port:
the kernel then delivers only the peer's datagrams to it, and answers anyone else's with
ICMP port unreachable, before QEMU sees them. QEMU gets it at a fixed descriptor number
(`NicPlan.fd`) as `-netdev dgram,local.type=fd,local.str=N`, for which QEMU 7.2 uses send()
with no address, so the connected socket works as it is.

Light on purpose (no psutil, no pydantic at run time): `bench/bare.py` opens the same sockets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlink.errors import HostError, PortInUseError

if TYPE_CHECKING:
    from qlink.plan.lab import NicPlan

Address = tuple[str, int]
FileAction = tuple[int, int] | tuple[int, int, int]
"""A `posix_spawn` file action: (POSIX_SPAWN_DUP2, fd, new_fd) or (POSIX_SPAWN_CLOSE, fd)."""


@dataclass(frozen=True, slots=True)
class LinkSocket:
    """What to open for one NIC: bound to `local`, connected to `remote`, and found by QEMU
    at descriptor number `fd`."""

    fd: int
    local: Address
    remote: Address

    @classmethod
    def of(cls, nic: NicPlan) -> LinkSocket:
        return cls(
            nic.fd, (nic.local_address, nic.local_port), (nic.remote_address, nic.remote_port)
        )

    @classmethod
    def parse(cls, fd: int, local: str, remote: str) -> LinkSocket:
        """From a plan document's NIC (`"fd"`, `"local"`, `"remote"` as `address:port`)."""
        return cls(fd, _address(local), _address(remote))


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def open_link_socket(link: LinkSocket) -> socket.socket:
    """The NIC's socket, bound and connected; close-on-exec, like every descriptor Python opens,
    so no other child inherits it and holds the port after its VM is gone.

    A port someone holds is a `PortInUseError` without a holder: naming it walks the host's
    sockets, which the caller does off the event loop if it wants to (`ports.udp_port_holder`).
    """
    address, port = link.local
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # No SO_REUSEADDR: with it, a second socket could bind the port too and share its frames.
        sock.bind(link.local)
        sock.connect(link.remote)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(port, address, None) from error
        raise HostError(
            f"cannot open UDP {address}:{port} to {link.remote[0]}:{link.remote[1]}: {error}"
        ) from error
    return sock


@contextlib.contextmanager
def open_link_sockets(links: Sequence[LinkSocket]) -> Iterator[list[socket.socket]]:
    """Every link's socket, open for the block and closed after it (by then QEMU holds its own
    copies); all or nothing: a failed open closes those already open."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(open_link_socket(link)) for link in links]


def placement_actions(moves: Sequence[tuple[int, int]]) -> list[FileAction]:
    """`posix_spawn` file actions that give the child, for each (source, target), a copy of
    this process's descriptor `source` at number `target`, none clobbered on the way.

    A plain dup2 per pair would overwrite a source that happens to sit at another pair's
    target before that source is copied. So every source is first copied above every number
    involved, then each copy goes down to its target(s), then the copies are closed. The
    copies (and the targets) have no close-on-exec flag; the sources keep theirs.
    """
    base = max((number for move in moves for number in move), default=-1) + 1
    spare = {
        source: base + index for index, source in enumerate(dict.fromkeys(s for s, _ in moves))
    }
    return [
        *((os.POSIX_SPAWN_DUP2, source, copy) for source, copy in spare.items()),
        *((os.POSIX_SPAWN_DUP2, spare[source], target) for source, target in moves),
        *((os.POSIX_SPAWN_CLOSE, copy) for copy in spare.values()),
    ]


def highest_descriptor(actions: Sequence[FileAction]) -> int:
    """The highest descriptor number the child needs for these actions."""
    return max((action[-1] for action in actions if action[0] == os.POSIX_SPAWN_DUP2), default=-1)


def check_descriptor_limit(highest: int) -> None:
    """Refuse a launch that needs a descriptor number the soft RLIMIT_NOFILE forbids: dup2
    onto it would fail inside posix_spawn with a bare EBADF."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and highest >= soft:
        raise HostError(
            f"handing QEMU its NIC sockets needs descriptor number {highest}, but the soft "
            f"RLIMIT_NOFILE of this process is {soft}: raise it (`ulimit -n`, or LimitNOFILE= "
            "in qlinkd.service, which sets 65536)"
        )
