"""What a node's file says about its guest beyond the VM: when it counts as ready, and its
day-0 configuration as written (rendered by `dayzero.py` once the plan knows the node's
interfaces).

Apart from `topology.py` (the lab's shape); both are pydantic models of the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import regex
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from qlink.errors import ConfigError
from qlink.sourcefile import read_topology_text
from qlink.yamlload import Location, Positions

MAX_PATTERN = 1000


class Readiness(BaseModel):
    """When the node's guest counts as ready, from one source:

    - `ready: {console: REGEX}`: a line its guest prints on the serial console matches (a
      login prompt, a NOS's own banner). Works for any guest, whatever it runs, since QEMU
      logs the console itself.
    - `ready: {agent: true}`: the QEMU guest agent answers `guest-ping` (qlink adds the
      virtio-serial channel `org.qemu.guest_agent.0`): the guest's userspace is up.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    console: str | None = None
    agent: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> Readiness:
        if (self.console is None) == (not self.agent):
            raise ValueError("name one source: `console: REGEX` or `agent: true`")
        return self

    @property
    def source(self) -> str:
        """For messages: what the node waits for."""
        return "the guest agent to answer guest-ping" if self.agent else (
            f"a console line to match {self.console!r}")  # fmt: skip

    @field_validator("console")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty pattern matches before the guest says anything")
        if len(value) > MAX_PATTERN:
            raise ValueError(f"a pattern of at most {MAX_PATTERN} characters")
        try:
            regex.compile(value)
        except regex.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return value


class DayZeroDoc(BaseModel):
    """One day-0 document as the file gives it (inline, or a template file's text), with where
    it was written, so that a template error names the topology file, line and field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    content: str | dict[str, Any]
    file: str
    line: int | None
    field: str
    template_file: str | None = None
    inline_lines: dict[str, int] = {}
    """For an inline mapping: the topology line of each path inside it, by `path_key`."""


class DayZero(BaseModel):
    """A node's day-0 configuration (`cloud_init`, `network_config`, `vars`), merged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_data: DayZeroDoc | None = None
    network_config: DayZeroDoc | None = None
    vars: dict[str, Any] = {}


def path_key(path: Sequence[str | int]) -> str:
    return "/".join(str(part) for part in path)


DocField = str | dict[str, Any] | None
Problem = tuple[Location, str]


def day_zero_of(
    name: str,
    set_on_node: Mapping[str, Any],
    merged: Mapping[str, Any],
    where: tuple[Positions, str, Path],
    problems: list[Problem],
) -> DayZero | None:
    """The node's DayZero from its merged fields (`cloud_init`, `network_config`, `vars`), or
    None when it has none. A file a field names is read here (relative to the topology
    file's folder): an unreadable one is a problem at the field's line."""
    if merged.get("cloud_init") is None and merged.get("network_config") is None:
        return None
    docs: dict[str, DayZeroDoc | None] = {}
    for field in ("cloud_init", "network_config"):
        location: Location = (
            ("nodes", name, field) if set_on_node.get(field) is not None else ("defaults", field)
        )
        docs[field] = _doc(merged.get(field), location, where, problems)
    return DayZero(
        user_data=docs["cloud_init"], network_config=docs["network_config"],
        vars=dict(merged.get("vars") or {}),
    )  # fmt: skip


def _doc(
    value: DocField,
    location: Location,
    where: tuple[Positions, str, Path],
    problems: list[Problem],
) -> DayZeroDoc | None:
    if value is None:
        return None
    positions, source, base = where
    field = ".".join(str(part) for part in location)
    line = positions.line_of(location)
    if isinstance(value, dict):
        lines = {
            path_key(path): found
            for path in _paths(value)
            if (found := positions.line_of((*location, *path))) is not None
        }
        return DayZeroDoc(content=value, file=source, line=line, field=field, inline_lines=lines)
    if "\n" in value:  # a block of text written inline
        return DayZeroDoc(content=value, file=source, line=line, field=field)
    path = Path(value) if Path(value).is_absolute() else base / value
    try:
        text = read_topology_text(path)
    except ConfigError as error:
        problems.append((location, error.issues[0].message.replace("cannot read", str(path))))
        return None
    return DayZeroDoc(content=text, file=source, line=line, field=field, template_file=str(path))


def _paths(tree: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))
