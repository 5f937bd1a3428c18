"""topology_converter DOT -> a qlink `Conversion` (pure: text in, conversion out).

The file is parsed by pydot's grammar (`pydot.dot_parser.GraphParser`), the parser
topology_converter itself builds on (as pydotplus); `dotlex.py` finds the line of each
statement for reports. What is mapped, and what is reported, is listed in `NODE_MAPPED`,
`NODE_REPORTED`, `LINK_REPORTED` below and in README.md ("Bring your lab").
"""

from __future__ import annotations

from typing import Any

from pydot.core import Dot, Edge
from pydot.core import Node as DotNode
from pydot.dot_parser import GraphParser
from pyparsing import ParseBaseException

from qlink.importers.dotlex import Locations, first_mention, locate
from qlink.importers.kindmap import kind_of_box
from qlink.importers.model import (
    MAX_INTERFACE_NAME,
    MAX_NODE_NAME,
    Conversion,
    ImportedLink,
    ImportedNode,
    lab_name_of,
)

# topology_converter's `function` -> qlink stage (its boot order: oob-server, oob-switch,
# exit, superspine, spine, leaf, tor, host, anything else).
FUNCTION_STAGES: dict[str, str] = {
    "oob-server": "oob-mgmt",
    "oob-switch": "oob-mgmt",
    "exit": "exit",
    "superspine": "superspine",
    "spine": "spine",
    "leaf": "leaf",
    "tor": "tor",
    "host": "host",
}

NODE_MAPPED = ("os", "memory", "function", "vagrant", "cpus")
NODE_REPORTED: dict[str, str] = {
    "version": "a Vagrant box version; a kind's image says which build boots (--kinds)",
    "config": "a provisioning script Vagrant runs after boot; qlink runs none: run it over "
    "`qlinkctl ssh`, or give a cloud-init guest the same as day-0 (cloud_init:)",
    "playbook": "run it against `qlinkctl inventory`",
    "mgmt_ip": "the management NIC is user-mode NAT (DHCP) with SSH forwarded to the host",
    "tunnel_ip": "qlink cables run on this host's loopback",
    "ssh_port": "qlink picks the SSH port (see `qlinkctl status`, `qlinkctl ssh-config`)",
    "vagrant_user": "the inventory logs in as root with qlinkd's key",
    "ports": "qlink makes only the ports that are cabled",
    "pxehost": "PXE boot is not supported",
    "remap": "no udev remap is needed: ports sit in the order their names give",
    "ubuntu": "deprecated in topology_converter; nothing to do",
    "legacy": "the host name comes from the node name",
}
LINK_MAPPED = ("left_mac", "right_mac")


def convert_dot(text: str, source: str) -> Conversion:
    """Convert topology_converter DOT text; `source` names it in reports and errors."""
    conversion = Conversion(source, "topology_converter DOT", "imported")
    try:
        graphs = list(GraphParser.parser.parse_string(text, parse_all=True))
    except ParseBaseException as error:
        conversion.error(error.lineno, "DOT", f"not DOT: {error.msg} (column {error.col})")
        conversion.raise_errors()
        raise AssertionError("unreachable") from error
    where = locate(text)
    graph: Dot = graphs[0]
    conversion.name = lab_name_of(_unquote(graph.get_name()) or "imported")
    if len(graphs) > 1:
        conversion.report(None, f"{len(graphs) - 1} more graph(s) after the first", "not read")
    for subgraph_line in where.subgraphs:
        conversion.report(
            subgraph_line,
            "subgraph",
            "not read (topology_converter reads only top-level statements)",
        )
    for what, statement in where.defaults:
        conversion.report(statement.line, f"`{what}` default or graph attribute", "drawing only")
    for node in sorted(graph.get_node_list(), key=_sequence):
        name = _unquote(node.get_name())
        if name in ("node", "edge", "graph"):
            continue  # a default statement, reported above
        _node(conversion, node, name, where, text)
    used: dict[tuple[str, str], int | None] = {}
    edges = sorted(graph.get_edge_list(), key=_sequence)
    for index, edge in enumerate(edges):
        line: int | None = where.edges[index].line if index < len(where.edges) else None
        attribute_lines = where.edges[index].attributes if index < len(where.edges) else {}
        _edge(conversion, edge, line=line, attribute_lines=attribute_lines, used=used, text=text)
    conversion.raise_errors()
    return conversion


def _sequence(item: DotNode | Edge) -> int:
    return int(item.obj_dict.get("sequence", 0))


def _unquote(value: Any) -> str:
    text = str(value)
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('\\"', '"')
    return text


def _node(conversion: Conversion, node: DotNode, name: str, where: Locations, text: str) -> None:
    statement = where.nodes.get(name)
    line = statement.line if statement else first_mention(text, name)
    lines = statement.attributes if statement else {}
    if not conversion.check_name(name, line, "node", MAX_NODE_NAME):
        return
    attributes = {key: _unquote(value) for key, value in node.get_attributes().items()}
    if attributes.get("function") == "fake":
        conversion.report(
            line, f'node {name}: function="fake"', "not simulated; cables to it are not made"
        )
        conversion.nodes[name] = ImportedNode(name, line, {"_fake": True})
        return
    imported = ImportedNode(name, line)
    for key, value in attributes.items():
        at = lines.get(key, line)
        if key in NODE_MAPPED:
            _mapped_attribute(conversion, imported, key, value, at)
        elif key in NODE_REPORTED:
            conversion.report(at, f'node {name}: {key}="{value}"', NODE_REPORTED[key])
        else:
            conversion.report(at, f'node {name}: {key}="{value}"', "not a qlink setting")
    conversion.nodes[name] = imported


def _mapped_attribute(
    conversion: Conversion, node: ImportedNode, key: str, value: str, line: int | None
) -> None:
    if key == "os":
        kind = kind_of_box(value)
        if kind is None:
            what = f'node {node.name}: os="{value}"'
            conversion.report(line, what, "no kind knows this box: give it an image or a kind")
            return
        node.fields["kind"] = kind
        node.comments["kind"] = f'os="{value}"'
    elif key in ("memory", "cpus"):
        if not value.isdigit() or int(value) == 0:
            conversion.error(
                line, f"{node.name}.{key}", f"{key}={value!r} is not a positive number"
            )
            return
        node.fields[key] = int(value)
    elif key == "function":
        stage = FUNCTION_STAGES.get(value)
        if stage is None:
            what = f'node {node.name}: function="{value}"'
            conversion.report(line, what, "no boot stage: it waits for nothing (stage: to order)")
            return
        node.fields["stage"] = stage
        node.comments["stage"] = f'function="{value}"'
    elif key == "vagrant" and conversion.check_name(value, line, "interface", MAX_INTERFACE_NAME):
        node.fields["mgmt"] = True
        node.fields["mgmt_port"] = value
        node.comments["mgmt_port"] = f'vagrant="{value}": the management NIC'


def _endpoint(conversion: Conversion, raw: Any, line: int | None) -> tuple[str, str] | None:
    parts = _split_port(str(raw))
    if len(parts) != 2:
        conversion.error(line, "edge", f'endpoint {raw} must be "node":"port"')
        return None
    node, port = parts
    ok = conversion.check_name(node, line, "node", MAX_NODE_NAME)
    ok = conversion.check_name(port, line, "interface", MAX_INTERFACE_NAME) and ok
    return (node, port) if ok else None


def _split_port(raw: str) -> list[str]:
    """`"leaf01":"swp1"` -> ["leaf01", "swp1"]: split on colons outside quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in raw:
        if char == '"':
            quoted = not quoted
        elif char == ":" and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [_unquote(part) for part in parts]


def _edge(
    conversion: Conversion,
    edge: Edge,
    *,
    line: int | None,
    attribute_lines: dict[str, int],
    used: dict[tuple[str, str], int | None],
    text: str,
) -> None:
    a = _endpoint(conversion, edge.get_source(), line)
    b = _endpoint(conversion, edge.get_destination(), line)
    if a is None or b is None:
        return
    attributes = {key: _unquote(value) for key, value in edge.get_attributes().items()}
    macs: list[str | None] = [None, None]
    for side, key in enumerate(LINK_MAPPED):
        if key in attributes:
            at = attribute_lines.get(key, line)
            macs[side] = conversion.check_mac(attributes.pop(key), at, f"{key}")
    for key, value in attributes.items():
        conversion.report(
            attribute_lines.get(key, line),
            f'cable {a[0]}:{a[1]} -- {b[0]}:{b[1]}: {key}="{value}"',
            "not a qlink setting",
        )
    for node, _ in (a, b):
        if node not in conversion.nodes:
            at = first_mention(text, node)
            conversion.report(at, f"node {node}", "only named in cables: made with no kind")
            conversion.nodes[node] = ImportedNode(node, at)
    fake = [node for node, _ in (a, b) if conversion.nodes[node].fields.get("_fake")]
    if fake:
        what = f"cable {a[0]}:{a[1]} -- {b[0]}:{b[1]}"
        conversion.report(line, what, f"not made ({fake[0]} is fake)")
        return
    link = ImportedLink(a, b, line, (macs[0], macs[1]))
    if a[0] == b[0]:
        link.comment = "two ports of one node, cabled to each other"
    conversion.add_link(link, used)
