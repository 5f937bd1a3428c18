"""A `Conversion` written as a readable qlink file: every node and cable with a comment
naming its source line, and what was not mapped listed at the top with its line.

`emit` also returns, for each line of the text, the source line it came from, so that an
error in the qlink file made from a foreign one can be told at the foreign file's line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qlink.importers.model import Conversion, ImportedLink, ImportedNode

_PLAIN = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_/]")
# Ordered as a reader looks for them: what it is, how big, when it boots, then the rest.
_FIELD_ORDER = ("kind", "image", "kernel", "initrd", "append", "memory", "cpus", "stage",
                "depends_on", "mgmt", "mgmt_port", "cloud_init")  # fmt: skip
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def scalar(value: Any) -> str:
    """A YAML scalar (flow collections as JSON, which YAML reads): plain when unambiguous."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        plain = _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS
        return value if plain and not value[0].isdigit() else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{scalar(k)}: {scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(scalar(item) for item in value) + "]"
    return json.dumps(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.origin: dict[int, int] = {}

    def add(self, text: str, source_line: int | None = None) -> None:
        self.lines.append(text)
        if source_line is not None:
            self.origin[len(self.lines)] = source_line


def emit(conversion: Conversion) -> tuple[str, dict[int, int]]:
    """The qlink file's text, and {its line: the source line}."""
    out = _Writer()
    source = Path(conversion.source).name
    out.add(f"# Made by `qlinkctl import` from {source} ({conversion.format}).")
    out.add(f"# Comments name the line of {source} each entry comes from.")
    if conversion.reports:
        out.add(f"# Not converted ({len(conversion.reports)}):")
        said: set[str] = set()
        for note in conversion.reports:
            at = f"{source}:{note.line}" if note.line is not None else source
            why = "" if not note.reason else f": {note.reason}"
            if note.reason in said:
                why = " (as above)"
            said.add(note.reason)
            out.add(f"#   {at}: {note.text}{why}", note.line)
    out.add(f"name: {conversion.name}")
    _kinds(out, conversion)
    out.add("nodes:")
    for node in conversion.nodes.values():
        _node(out, node, source)
    if conversion.links:
        out.add("links:")
    for link in conversion.links:
        _link(out, link, source)
    return "\n".join(out.lines) + "\n", out.origin


def _kinds(out: _Writer, conversion: Conversion) -> None:
    if not conversion.kinds:
        return
    given = Path(conversion.kinds_source).name if conversion.kinds_source else None
    out.add("kinds:")
    for name, fields in conversion.kinds.items():
        if fields:
            out.add(f"  {name}: {scalar(fields)}" + (f"  # from {given}" if given else ""))
        else:
            out.add(f"  {name}: {{}}  # built-in; boots nothing until it has an image: (--kinds)")


def _node(out: _Writer, node: ImportedNode, source: str) -> None:
    out.add(f"  {node.name}:  # {source}:{node.line}", node.line)
    fields = sorted(
        ((key, value) for key, value in node.fields.items() if not key.startswith("_")),
        key=lambda item: _FIELD_ORDER.index(item[0]) if item[0] in _FIELD_ORDER else 99,
    )
    for key, value in fields:
        comment = f"  # {node.comments[key]}" if key in node.comments else ""
        out.add(f"    {key}: {scalar(value)}{comment}", node.line)


def _link(out: _Writer, link: ImportedLink, source: str) -> None:
    ends = f"[{link.a[0]}:{link.a[1]}, {link.b[0]}:{link.b[1]}]"
    comment = f"  # {source}:{link.line}" + (f": {link.comment}" if link.comment else "")
    if link.macs == (None, None):
        out.add(f"  - {ends}{comment}", link.line)
        return
    out.add(f"  - endpoints: {ends}{comment}", link.line)
    out.add(f"    macs: {scalar(list(link.macs))}", link.line)
