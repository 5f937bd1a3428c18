"""Which qlink kind a foreign file's node becomes, and the `--kinds FILE` that points kinds
at images.

topology_converter names a Vagrant box (`os="CumulusCommunity/cumulus-vx"`), containerlab a
kind (`cvx`, `sonic-vm`, `vr-veos`, `linux`). Both map onto qlink's built-in kinds
(qlink/kinds.py) by what the name says; a name none matches gets no kind (reported).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlink.errors import ConfigError, ConfigIssue
from qlink.kinds import BUILTIN_KINDS
from qlink.sourcefile import read_topology_text
from qlink.topology import NodeSettings
from qlink.yamlload import load_document

# Substrings of a Vagrant box name (lowercase), in the order they are tried.
_BOX_WORDS: tuple[tuple[str, str], ...] = (
    ("cumulus", "cumulus-vx"),
    ("sonic", "sonic-vs"),
    ("veos", "arista-veos"),
    ("arista", "arista-veos"),
    ("ubuntu", "linux"),
    ("debian", "linux"),
    ("centos", "linux"),
    ("fedora", "linux"),
    ("rocky", "linux"),
    ("alma", "linux"),
    ("generic/", "linux"),
    ("boxcutter/", "linux"),
)

# containerlab kinds (their current names and the older aliases) -> qlink kind.
CLAB_KINDS: dict[str, str] = {
    "cumulus_cvx": "cumulus-vx",
    "cvx": "cumulus-vx",
    "sonic-vs": "sonic-vs",
    "sonic-vm": "sonic-vs",
    "arista_veos": "arista-veos",
    "vr-veos": "arista-veos",
    "vr-arista_veos": "arista-veos",
    "arista_ceos": "arista-veos",
    "ceos": "arista-veos",
    "linux": "linux",
}
CLAB_CONTAINER_ONLY = {"arista_ceos", "ceos", "sonic-vs", "cvx", "cumulus_cvx"}
"""Kinds containerlab runs as containers: qlink runs the same NOS as a VM, from an image."""


def kind_of_box(box: str) -> str | None:
    lowered = box.lower()
    for word, kind in _BOX_WORDS:
        if word in lowered:
            return kind
    return None


def load_kinds_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """`--kinds FILE`: `kinds: {NAME: {node fields}}` (or that mapping alone), each kind
    validated as node fields; relative paths made absolute against the file's folder, since
    the qlink file written from the import may live elsewhere."""
    source = str(path)
    document, positions = load_document(read_topology_text(path), source)
    kinds = document.get("kinds", document) if isinstance(document, Mapping) else None
    if not isinstance(kinds, Mapping):
        raise ConfigError([ConfigIssue(source, 1, "kinds", "a mapping of kind name to fields")])
    base = Path(path).resolve().parent
    result: dict[str, dict[str, Any]] = {}
    issues: list[ConfigIssue] = []
    prefix = ("kinds",) if "kinds" in document else ()
    for name, body in kinds.items():
        fields = dict(body or {})
        try:
            NodeSettings.model_validate(fields)
        except ValueError as error:
            issues.append(
                ConfigIssue(source, positions.line_of((*prefix, name)), str(name), str(error))
            )
            continue
        for key in ("kernel", "initrd", "image"):
            if isinstance(fields.get(key), str) and not Path(fields[key]).is_absolute():
                fields[key] = str(base / fields[key])
        result[str(name)] = _plain(fields)
    if issues:
        raise ConfigError(issues)
    return result


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def is_builtin(kind: str) -> bool:
    return kind in BUILTIN_KINDS
