"""A node's day-0 seed, rendered from its file's `cloud_init` / `network_config` / `vars` once
the plan knows its interfaces (MACs, peers, positions). Pure: `runtime/seed.py` writes it."""

from __future__ import annotations

from collections.abc import Sequence

from qlink.dayzero import Interface, NodeFacts, Origin, Seed, Source, render_seed
from qlink.guestspec import DayZeroDoc, path_key
from qlink.topology import Node
from qlink.yamlload import Location


def seed_of(lab: str, node: Node, interfaces: Sequence[Interface]) -> Seed | None:
    """The node's NoCloud seed, or None without day-0 settings; a ConfigError, located, when
    a template does not render."""
    if node.day0 is None:
        return None
    facts = NodeFacts(lab, node.name, interfaces, node.day0.vars)
    return render_seed(facts, _source(node.day0.user_data), _source(node.day0.network_config))


def _source(doc: DayZeroDoc | None) -> Source | None:
    if doc is None:
        return None
    lines = doc.inline_lines

    def line_of(path: Location) -> int | None:
        return lines.get(path_key(path))

    origin = Origin(doc.file, doc.line, doc.field, doc.template_file, line_of)
    return Source(doc.content, origin)
