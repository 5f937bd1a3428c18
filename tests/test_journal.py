"""journald's native protocol, read back the way journald parses it."""

from __future__ import annotations

import io
import socket
import struct
from pathlib import Path

from qlink.journal import JournalLogger, encode, field_name, journal_fields


def parse(datagram: bytes) -> dict[str, str]:
    """What journald does with a datagram (systemd's journald-native.c, in short)."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, sep, after = rest.partition(b"\n")
        assert sep, "every field ends with a newline"
        if b"=" in line:
            key, _, value = line.partition(b"=")
            rest = after
        else:
            key = line
            (length,) = struct.unpack("<Q", after[:8])
            value, rest = after[8 : 8 + length], after[8 + length :]
            assert rest[:1] == b"\n"
            rest = rest[1:]
        fields[key.decode()] = value.decode()
    return fields


def test_fields_are_journald_names() -> None:
    assert field_name("node") == "NODE"
    assert field_name("exit-status") == "EXIT_STATUS"
    assert field_name("_private") == "PRIVATE"
    assert field_name("") == "FIELD"


def test_an_event_becomes_a_readable_message_and_one_field_per_key() -> None:
    event = {"event": "vm_adopted", "level": "info", "lab": "clos", "node": "spine1", "pid": 42}
    fields = parse(encode(journal_fields(event, "qlinkd")))
    assert fields["MESSAGE"] == "vm_adopted lab=clos node=spine1 pid=42"
    assert (fields["NODE"], fields["LAB"], fields["PID"]) == ("spine1", "clos", "42")
    assert (fields["PRIORITY"], fields["SYSLOG_IDENTIFIER"]) == ("6", "qlinkd")


def test_values_with_newlines_use_the_length_prefixed_form() -> None:
    event = {"event": "launch_failed", "level": "error", "stderr": "line 1\nline 2"}
    fields = parse(encode(journal_fields(event, "qlinkd")))
    assert fields["STDERR"] == "line 1\nline 2"
    assert fields["PRIORITY"] == "3"


def test_a_record_reaches_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(str(path))
        JournalLogger("qlinkd", io.StringIO(), str(path)).info(event="started", level="info")
        assert parse(journald.recv(65536))["MESSAGE"] == "started"


def test_without_journald_the_record_is_a_json_line(tmp_path: Path) -> None:
    fallback = io.StringIO()
    JournalLogger("qlinkd", fallback, str(tmp_path / "absent.sock")).info(
        event="started", node="r1"
    )
    assert fallback.getvalue() == '{"event": "started", "node": "r1"}\n'
