"""Reading a topology file's text: bounded in size, and UTF-8 or a located error.

Apart from `topology.py`, so that `qlinkctl up`, which only sends the text to qlinkd, makes
the same checks without importing the validation stack (pydantic, PyYAML).
"""

from __future__ import annotations

import os
from pathlib import Path

from qlink.errors import ConfigError, ConfigIssue

MAX_TOPOLOGY_BYTES = 4 * 1024 * 1024


def read_topology_text(path: str | Path) -> str:
    """The text of a topology file: at most `MAX_TOPOLOGY_BYTES`, and UTF-8.

    Each failure is a ConfigError naming the file: why it cannot be read, its size, or the
    line and byte offset of the first byte that is not UTF-8.
    """
    source = str(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            # Read one byte past the bound: /dev/zero or a pipe has no size to stat.
            data = b"" if size > MAX_TOPOLOGY_BYTES else file.read(MAX_TOPOLOGY_BYTES + 1)
    except OSError as error:
        raise ConfigError([ConfigIssue(source, None, "", f"cannot read: {error}")]) from error
    if size > MAX_TOPOLOGY_BYTES or len(data) > MAX_TOPOLOGY_BYTES:
        what = f"{size} bytes" if size > MAX_TOPOLOGY_BYTES else "more than that"
        raise ConfigError([ConfigIssue(source, None, "", too_big(what))])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        hint = (
            " (a UTF-16 file? save it as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        )
        message = (
            f"not UTF-8: byte 0x{data[error.start]:02x} at byte offset {error.start} "
            f"(line {line}, byte {column} of the line) cannot be decoded{hint}"
        )
        raise ConfigError([ConfigIssue(source, line, "", message)]) from error


def too_big(what: str) -> str:
    return (
        f"{what}: a topology file may be at most {MAX_TOPOLOGY_BYTES} bytes "
        f"({MAX_TOPOLOGY_BYTES // (1024 * 1024)} MiB)"
    )


def check_text(text: str, source: str) -> None:
    """Text that did not come from `read_topology_text` (the daemon's clients send theirs)
    meets the same bounds: its size in UTF-8, and no lone surrogate (JSON's `\\ud800`), which
    libyaml cannot take."""
    if len(text) > MAX_TOPOLOGY_BYTES:  # every character is at least one byte
        raise ConfigError([ConfigIssue(source, None, "", too_big(f"{len(text)} characters"))])
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as error:
        line = text.count("\n", 0, error.start) + 1
        message = (
            f"not text: a lone surrogate U+{ord(text[error.start]):04X} at character {error.start}"
        )
        raise ConfigError([ConfigIssue(source, line, "", message)]) from error
    if size > MAX_TOPOLOGY_BYTES:
        raise ConfigError([ConfigIssue(source, None, "", too_big(f"{size} bytes"))])


def foreign_format(path: str | Path, text: str) -> str | None:
    """`dot` (topology_converter), `clab` (containerlab), or None for a qlink file: by the
    file's extension, then by its first words (`graph`, or a top-level `topology:`).
    Here, not in qlink/importers/, so that `up` of a qlink file imports no importer."""
    name = Path(path).name.lower()
    if name.endswith((".dot", ".gv")):
        return "dot"
    if name.endswith((".clab.yml", ".clab.yaml")):
        return "clab"
    if text.lstrip().startswith(("graph", "digraph", "strict")):
        return "dot"
    lines = text.splitlines()
    if "topology:" in lines and "nodes:" not in lines:
        return "clab"
    return None
