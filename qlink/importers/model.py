"""What an importer makes of a foreign lab file: qlink nodes and links, each with the source
line it came from, and every construct it did not map, reported with its line.

The importers (`dot.py`, `clab.py`) fill a `Conversion`; `emit.py` writes it as a qlink file.
Nothing here reads or writes a file: a conversion is a pure function of the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qlink.errors import ConfigError, ConfigIssue

# The same rules as topology.py's names; checked here so that a bad name is located in the
# foreign file rather than in the qlink file made from it.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NODE_NAME = 63
MAX_INTERFACE_NAME = 15
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}")


@dataclass
class Note:
    """One thing said about the source: where, and what (a report or a comment)."""

    line: int | None
    text: str
    reason: str = ""
    """Why it is not mapped; said once in the qlink file for all notes that share it."""


@dataclass
class ImportedNode:
    name: str
    line: int | None
    fields: dict[str, Any] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)
    """A comment for a field's line: what it was in the source (`os="..."`)."""


@dataclass
class ImportedLink:
    a: tuple[str, str]
    b: tuple[str, str]
    line: int | None
    macs: tuple[str | None, str | None] = (None, None)
    comment: str = ""


@dataclass
class Conversion:
    """A foreign lab as qlink sees it. `reports` lists what was not mapped, with its line."""

    source: str
    format: str
    name: str
    nodes: dict[str, ImportedNode] = field(default_factory=dict)
    links: list[ImportedLink] = field(default_factory=list)
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The kinds the nodes use, with what `--kinds` gives each (image, ...)."""
    kinds_source: str | None = None
    reports: list[Note] = field(default_factory=list)
    errors: list[ConfigIssue] = field(default_factory=list)

    def report(self, line: int | None, text: str, reason: str = "") -> None:
        self.reports.append(Note(line, text, reason))

    def error(self, line: int | None, what: str, message: str) -> None:
        self.errors.append(ConfigIssue(self.source, line, what, message))

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigError(sorted(self.errors, key=lambda issue: issue.line or 0))

    def check_name(self, name: str, line: int | None, what: str, limit: int) -> bool:
        if NAME_RE.fullmatch(name) and len(name) <= limit:
            return True
        self.error(
            line,
            what,
            f"{what} name {name!r} cannot be a qlink name: letters, digits, '_', '.' and '-', "
            f"starting with a letter or digit, at most {limit} characters",
        )
        return False

    def check_mac(self, mac: str, line: int | None, what: str) -> str | None:
        if not _MAC_RE.fullmatch(mac):
            self.error(line, what, f"bad MAC address {mac!r}: six octets, e.g. 44:38:39:00:00:01")
            return None
        octets = [int(part, 16) for part in re.split("[:-]", mac)]
        if octets[0] & 1 or not any(octets):
            self.error(line, what, f"MAC address {mac!r} is not a unicast address")
            return None
        return ":".join(f"{octet:02x}" for octet in octets)

    def add_link(self, link: ImportedLink, used: dict[tuple[str, str], int | None]) -> None:
        """Add a link unless one of its ends is already cabled (a located error)."""
        for end in (link.a, link.b):
            if end in used:
                first = used[end]
                self.error(
                    link.line,
                    f"{end[0]}:{end[1]}",
                    f"{end[0]}:{end[1]} is already cabled"
                    + (f" (line {first})" if first is not None else ""),
                )
                return
        used[link.a] = used[link.b] = link.line
        self.links.append(link)


def lab_name_of(text: str) -> str:
    """A qlink lab name (lowercase letters, digits, '-', at most 32) made from any name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:32].strip("-")
    return name or "imported"
