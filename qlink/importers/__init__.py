"""Foreign lab files in: topology_converter DOT (`dot.py`) and containerlab YAML (`clab.py`)
become a `Conversion` (`model.py`), finished against the kinds (`finish`), written as a qlink
file (`emit.py`), and validated like any qlink file with errors told at the foreign file's
lines (`validate`). Pure: text in, text out; no daemon, nothing started.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlink.errors import ConfigError, ConfigIssue
from qlink.importers.emit import emit
from qlink.importers.model import Conversion
from qlink.kinds import BUILTIN_KINDS
from qlink.sourcefile import foreign_format
from qlink.topology import Lab, parse_topology_text

FORMATS = ("dot", "clab")


def detect(path: str | Path, text: str) -> str | None:
    """`dot`, `clab`, or None for a qlink file (`sourcefile.foreign_format`)."""
    return foreign_format(path, text)


def convert(
    text: str, source: str, kind: str, kinds: Mapping[str, dict[str, Any]] | None = None,
    kinds_source: str | None = None,
) -> Conversion:  # fmt: skip
    """The foreign file's conversion, finished against `kinds` (from `--kinds FILE`)."""
    if kind == "dot":
        from qlink.importers.dot import convert_dot  # noqa: PLC0415 (pydot only for DOT)

        conversion = convert_dot(text, source)
    else:
        from qlink.importers.clab import convert_clab  # noqa: PLC0415

        conversion = convert_clab(text, source)
    finish(conversion, kinds or {}, kinds_source)
    return conversion


def finish(
    conversion: Conversion, kinds: Mapping[str, dict[str, Any]], kinds_source: str | None
) -> None:
    """Give the conversion its kinds' fields; drop fake nodes; a cable on a node's
    management port (which qlink's management NIC is) is reported and not made."""
    conversion.kinds_source = kinds_source
    conversion.nodes = {
        name: node for name, node in conversion.nodes.items() if not node.fields.get("_fake")
    }
    used = sorted({str(node.fields["kind"]) for node in conversion.nodes.values()
                   if "kind" in node.fields})  # fmt: skip
    conversion.kinds = {name: dict(kinds.get(name, {})) for name in used}
    for name, fields in kinds.items():
        if name not in conversion.kinds and name not in BUILTIN_KINDS:
            conversion.kinds[name] = dict(fields)  # the user's own kinds, for `kind:` edits
    kept = []
    for link in conversion.links:
        taken = [end for end in (link.a, link.b) if _is_mgmt_port(conversion, kinds, *end)]
        if taken:
            node, port = taken[0]
            conversion.report(
                link.line,
                f"cable {link.a[0]}:{link.a[1]} -- {link.b[0]}:{link.b[1]} ({node}:{port})",
                "not made: the node's management port is qlink's management NIC (its SSH)",
            )
        else:
            kept.append(link)
    conversion.links = kept
    conversion.reports.sort(key=lambda note: note.line or 0)


def _is_mgmt_port(
    conversion: Conversion, kinds: Mapping[str, dict[str, Any]], node: str, port: str
) -> bool:
    fields = conversion.nodes[node].fields
    kind_name = fields.get("kind")
    settings: dict[str, Any] = {}
    if isinstance(kind_name, str):
        builtin = BUILTIN_KINDS.get(kind_name)
        if builtin is not None:
            settings |= builtin.model_dump(exclude_unset=True)
        settings |= kinds.get(kind_name, {})
    settings |= fields
    return bool(settings.get("mgmt")) and settings.get("mgmt_port") == port


def to_qlink(conversion: Conversion) -> tuple[str, dict[int, int]]:
    return emit(conversion)


def validate(conversion: Conversion, output_source: str) -> Lab:
    """Validate the qlink file made from `conversion` as `up` would, every error told at the
    foreign file's line (the qlink file's line and field follow in the message)."""
    text, origin = emit(conversion)
    try:
        return parse_topology_text(text, output_source)
    except ConfigError as error:
        raise ConfigError(
            [
                ConfigIssue(
                    conversion.source,
                    origin.get(issue.line or 0),
                    issue.field,
                    issue.message + _hint(issue, conversion),
                )
                for issue in error.issues
            ]
        ) from error


def _hint(issue: ConfigIssue, conversion: Conversion) -> str:
    if "needs `kernel`" in issue.message and conversion.kinds_source is None:
        return " (give its kind an image with --kinds FILE)"
    return ""
