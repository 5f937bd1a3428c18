"""Who is at the other end of a control socket connection: the kernel says (SO_PEERCRED).

The credentials are those of the process that connected, taken by the kernel at connect();
a client cannot claim to be someone else. Anything that is not a unix socket (a test's TCP
site, a connection already gone) has no peer uid: None, which the callers treat as the
least privileged caller there is.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from aiohttp import web

PeerUid = Callable[[web.Request], int | None]
"""How the API learns the caller's uid; tests inject their own."""

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def peer_uid(request: web.Request) -> int | None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)
