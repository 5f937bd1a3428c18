"""Log records to journald as fields, through its native protocol.

Written here rather than taken from `systemd-python`: that binding is a C extension that needs
libsystemd-dev and a compiler at install time, and the protocol it would wrap is a stable,
documented datagram format (systemd's "Native Journal Protocol") of a few lines, like the
sd_notify of `qlink/systemd.py`. A record that cannot be sent (no journald, a full socket
buffer) is written as a JSON line to the fallback stream instead: logging never blocks the
event loop and never takes the daemon down.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# syslog priorities, as journalctl -p reads them
_PRIORITY = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}
# A datagram must fit the socket's buffer; longer values are cut (a QEMU stderr tail is the
# longest thing qlinkd logs, and its start is what matters).
_VALUE_LIMIT = 48 * 1024
_NOT_FIELD_CHARACTER = re.compile(r"[^A-Z0-9_]")


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def field_name(key: str) -> str:
    """`node` → `NODE`: journald takes upper-case letters, digits and `_`, not first."""
    name = _NOT_FIELD_CHARACTER.sub("_", key.upper()).lstrip("_")
    return name[:64] or "FIELD"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def encode(fields: Mapping[str, str]) -> bytes:
    """The native protocol: `KEY=value\\n`, or KEY, newline, 64-bit LE length, value, newline
    when the value has a newline of its own."""
    parts: list[bytes] = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")[:_VALUE_LIMIT]
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def journal_fields(event: Mapping[str, Any], identifier: str) -> dict[str, str]:
    """One structlog event as journald fields: MESSAGE reads like a text log line, and every
    key of the event is also a field of its own (`journalctl NODE=spine1`)."""
    message = str(event.get("event", ""))
    extras = {key: value for key, value in event.items() if key not in ("event", "level")}
    summary = " ".join(f"{key}={_text(value)}" for key, value in extras.items()
                       if key not in ("timestamp", "exception"))  # fmt: skip
    fields = {
        "MESSAGE": f"{message} {summary}".rstrip(),
        "PRIORITY": str(_PRIORITY.get(str(event.get("level", "info")), 6)),
        "SYSLOG_IDENTIFIER": identifier,
    }
    for key, value in extras.items():
        name = field_name(key)
        if name not in fields:
            fields[name] = _text(value)
    if "exception" in event:
        fields["MESSAGE"] += "\n" + str(event["exception"])
    return fields


class JournalLogger:
    """A structlog logger whose last processor hands it the event dict as keywords."""

    def __init__(self, identifier: str, fallback: TextIO, path: str = JOURNAL_SOCKET) -> None:
        self._identifier = identifier
        self._fallback = fallback
        self._path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)

    def msg(self, **event: Any) -> None:
        try:
            self._socket.sendto(encode(journal_fields(event, self._identifier)), self._path)
        except OSError:
            print(json.dumps(event, default=str), file=self._fallback, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg
