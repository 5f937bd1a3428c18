"""containerlab YAML (`*.clab.yml`) -> a qlink `Conversion` (pure: text in, conversion out).

Read with qlink's own YAML loader (bounded, every line kept). A node's settings are
containerlab's: the node's own over its kind's (`topology.kinds`) over `topology.defaults`.
What is mapped and what is reported is listed in `NODE_REPORTED` and README.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from qlink.importers.kindmap import CLAB_CONTAINER_ONLY, CLAB_KINDS
from qlink.importers.model import (
    MAX_INTERFACE_NAME,
    MAX_NODE_NAME,
    Conversion,
    ImportedLink,
    ImportedNode,
    lab_name_of,
)
from qlink.kinds import BUILTIN_KINDS
from qlink.yamlload import Location, Positions, load_document

NOT_VMS = {"bridge", "ovs-bridge", "host", "ext-container"}
"""containerlab kinds that are the host's own devices, not a VM qlink could run."""
DAY_ZERO_KINDS = {"linux"}
"""qlink kinds whose guests read a day-0 seed (cloud-init NoCloud)."""
_CONTAINER = "a container setting; a qlink node is a VM"
NODE_REPORTED: dict[str, str] = {
    "image": "a container image; a qlink kind boots a VM disk image (--kinds)",
    "mgmt-ipv4": "not applicable: the management NIC is user-mode NAT with SSH forwarded",
    "mgmt-ipv6": "not applicable: the management NIC is user-mode NAT with SSH forwarded",
    "type": "a hardware variant of the NOS; the image decides it",
    "license": "put the license in the image or apply it after boot",
    "group": "drawing only",
    "labels": "drawing and tooling only",
    "enforce-startup-config": "there is no saved configuration to override",
    "suppress-startup-config": "there is no saved configuration to override",
    **dict.fromkeys(
        ("env", "binds", "ports", "exec", "cmd", "entrypoint", "user", "network-mode",
         "publish", "sysctls", "cpu-set", "shm-size", "dns", "extras", "certificate",
         "healthcheck", "image-pull-policy", "runtime", "auto-remove", "restart-policy",
         "env-files", "devices", "aliases", "components", "config"),
        _CONTAINER,
    ),
}  # fmt: skip
_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)
_ETH = re.compile(r"eth(\d+)")


class _Reader:
    """The document with its lines: `line(*path)` for any key or item."""

    def __init__(self, conversion: Conversion, positions: Positions) -> None:
        self.conversion = conversion
        self.positions = positions
        self.reported: set[Location] = set()
        """Settings of `defaults` or a kind, which many nodes share: reported once."""

    def line(self, *location: str | int) -> int | None:
        return self.positions.line_of(tuple(location))


def convert_clab(text: str, source: str) -> Conversion:
    """Convert containerlab text; `source` names it in reports and errors."""
    conversion = Conversion(source, "containerlab", "imported")
    document, positions = load_document(text, source)
    read = _Reader(conversion, positions)
    topology = document.get("topology") if isinstance(document, Mapping) else None
    if not isinstance(topology, Mapping) or not isinstance(topology.get("nodes"), Mapping):
        conversion.error(1, "topology.nodes", "a containerlab file has topology: {nodes: ...}")
        conversion.raise_errors()
        raise AssertionError("unreachable")
    conversion.name = lab_name_of(str(document.get("name") or "imported"))
    for key in document:
        if key not in ("name", "topology"):
            conversion.report(read.line(key), key, _TOP_REASONS.get(key, "not read"))
    for key in topology:
        if key not in ("defaults", "kinds", "nodes", "links"):
            conversion.report(read.line("topology", key), f"topology.{key}", "not read")
    defaults = _mapping(read, topology, "defaults")
    kinds = _mapping(read, topology, "kinds")
    for name, body in topology["nodes"].items():
        _node(read, str(name), body or {}, defaults, kinds)
    links = topology.get("links") or []
    if not isinstance(links, list):
        conversion.error(read.line("topology", "links"), "topology.links", "a list of links")
        links = []
    used: dict[tuple[str, str], int | None] = {}
    for index, link in enumerate(links):
        _link(read, index, link, used)
    conversion.raise_errors()
    return conversion


def _mapping(read: _Reader, topology: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """`topology.defaults` or `topology.kinds`: a mapping, or an error at its line."""
    value = topology.get(key) or {}
    if isinstance(value, Mapping):
        return value
    read.conversion.error(read.line("topology", key), f"topology.{key}", "must be a mapping")
    return {}


_TOP_REASONS = {
    "mgmt": "not applicable: qlink's management NIC is user-mode NAT, no bridge or subnet",
    "prefix": "qlink names VMs by node name within the lab",
    "settings": "containerlab's own settings",
}


def _layers(
    name: str, body: Mapping[str, Any], defaults: Mapping[str, Any], kinds: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Location]]:
    """The node's settings (node over kind over defaults) and where each was written."""
    merged: dict[str, Any] = {}
    where: dict[str, Location] = {}
    kind = body.get("kind", defaults.get("kind"))
    layers: list[tuple[Location, Mapping[str, Any]]] = [(("topology", "defaults"), defaults)]
    if isinstance(kind, str) and isinstance(kinds.get(kind), Mapping):
        layers.append((("topology", "kinds", kind), kinds[kind]))
    layers.append((("topology", "nodes", name), body))
    for base, layer in layers:
        for key, value in layer.items():
            merged[key] = value
            where[key] = (*base, key)
    return merged, where


def _node(
    read: _Reader,
    name: str,
    body: Any,
    defaults: Mapping[str, Any],
    kinds: Mapping[str, Any],
) -> None:
    conversion = read.conversion
    line = read.line("topology", "nodes", name)
    if not conversion.check_name(name, line, "node", MAX_NODE_NAME):
        return
    if not isinstance(body, Mapping):
        conversion.error(line, f"topology.nodes.{name}", "a node is a mapping of settings")
        return
    settings, where = _layers(name, body, defaults, kinds)
    clab_kind = str(settings.get("kind", ""))
    node = ImportedNode(name, line)
    node.fields["_clab_kind"] = clab_kind
    conversion.nodes[name] = node
    if clab_kind in NOT_VMS:
        conversion.report(line, f"node {name}: kind {clab_kind}",
                          "a device of the host, not a VM: not made, nor its cables")  # fmt: skip
        node.fields["_fake"] = True
        return
    _kind(read, node, clab_kind, read.line(*where["kind"]) if "kind" in where else line)
    for key, value in settings.items():
        _setting(read, node, key, value, where[key])


def _kind(read: _Reader, node: ImportedNode, clab_kind: str, line: int | None) -> None:
    kind = CLAB_KINDS.get(clab_kind)
    if kind is None:
        what = f"node {node.name}: kind {clab_kind or '(none)'}"
        read.conversion.report(line, what, "no qlink kind runs it: give it an image or a kind")
        return
    node.fields["kind"] = kind
    node.comments["kind"] = f"kind: {clab_kind}"
    if clab_kind in CLAB_CONTAINER_ONLY:
        node.comments["kind"] += " (a container there; the same NOS as a VM here)"


def _setting(read: _Reader, node: ImportedNode, key: str, value: Any, where: Location) -> None:
    conversion = read.conversion
    line = read.line(*where)
    if key == "kind":
        return
    if key == "memory":
        mebibytes = _mebibytes(str(value))
        if mebibytes is None:
            conversion.error(line, f"{node.name}.memory", f"memory {value!r}: e.g. 1GB, 512MB")
        else:
            node.fields["memory"] = mebibytes
            node.comments["memory"] = f"memory: {value}"
    elif key == "cpu":
        try:
            node.fields["cpus"] = max(1, math.ceil(float(value)))
            node.comments["cpus"] = f"cpu: {value}"
        except (TypeError, ValueError):
            conversion.error(line, f"{node.name}.cpu", f"cpu {value!r} is not a number")
    elif key == "startup-config":
        _startup_config(read, node, str(value), line)
    elif key in ("wait-for", "stages"):
        _waits(read, node, key, value, line)
    elif where not in read.reported:
        read.reported.add(where)
        shared = where[1] != "nodes"
        what = ".".join(str(part) for part in where) if shared else f"node {node.name}: {key}"
        conversion.report(line, what, NODE_REPORTED.get(key, "not a qlink setting"))


def _startup_config(read: _Reader, node: ImportedNode, path: str, line: int | None) -> None:
    kind = node.fields.get("kind")
    if kind in DAY_ZERO_KINDS:
        node.fields["cloud_init"] = path
        node.comments["cloud_init"] = "startup-config: the day-0 user-data"
        return
    read.conversion.report(
        line, f"node {node.name}: startup-config: {path}",
        f"kind {kind or '(none)'} reads no day-0 seed: apply it after boot (Ansible, ssh)",
    )  # fmt: skip


def _waits(read: _Reader, node: ImportedNode, key: str, value: Any, line: int | None) -> None:
    """`wait-for: [a]` and `stages: {create: {wait-for: [{node: a}]}}` -> depends_on."""
    names: list[str] = []
    entries: Any = value
    if key == "stages" and isinstance(value, Mapping):
        entries = [
            entry
            for stage in value.values()
            if isinstance(stage, Mapping)
            for entry in stage.get("wait-for") or []
        ]
    for entry in entries if isinstance(entries, list) else []:
        other = entry.get("node") if isinstance(entry, Mapping) else entry
        if isinstance(other, str):
            names.append(other)
    if not names:
        read.conversion.report(line, f"node {node.name}: {key}", "no node to wait for in it")
        return
    node.fields["depends_on"] = sorted({*node.fields.get("depends_on", []), *names})
    node.comments["depends_on"] = f"{key}: the nodes it waits for"


def _mebibytes(text: str) -> int | None:
    """containerlab reads memory as Docker does (go-units RAMInBytes): every unit binary."""
    match = _MEMORY.fullmatch(text)
    if match is None:
        return None
    scale = {"": 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024**2}
    mebibytes = math.ceil(float(match.group(1)) * scale[match.group(2).lower()])
    return mebibytes if mebibytes > 0 else None


def _endpoint(read: _Reader, raw: Any, where: Location) -> tuple[str, str, str | None, str] | None:
    """(node, qlink interface, fixed MAC, how the file wrote it) of a link end."""
    conversion = read.conversion
    line = read.line(*where)
    mac: str | None = None
    if isinstance(raw, Mapping):
        node, interface = str(raw.get("node", "")), str(raw.get("interface", ""))
        if raw.get("mac") is not None:
            mac = conversion.check_mac(str(raw["mac"]), read.line(*where, "mac"), "mac")
    elif isinstance(raw, str) and raw.count(":") == 1:
        node, interface = raw.split(":")
    else:
        conversion.error(line, "endpoints", f"endpoint {raw!r} must be NODE:INTERFACE")
        return None
    ok = conversion.check_name(node, line, "node", MAX_NODE_NAME)
    ok = conversion.check_name(interface, line, "interface", MAX_INTERFACE_NAME) and ok
    if not ok:
        return None
    written = f"{node}:{interface}"
    imported = conversion.nodes.get(node)
    if imported is None:
        conversion.error(line, "endpoints", f"unknown node {node!r}")
        return None
    return node, _port_name(imported, interface), mac, written


def _port_name(node: ImportedNode, interface: str) -> str:
    """containerlab's `ethN` of a VM kind is the NOS's data port N (eth0 is management):
    ethN becomes the qlink kind's port name, as containerlab itself renames it."""
    kind = BUILTIN_KINDS.get(str(node.fields.get("kind", "")))
    match = _ETH.fullmatch(interface)
    if kind is None or kind.ports is None or match is None or kind.ports.prefix == "eth":
        return interface
    number = int(match.group(1))
    if number == 0:
        return kind.mgmt_port or interface
    return f"{kind.ports.prefix}{kind.ports.first + (number - 1) * kind.ports.step}"


def _link(read: _Reader, index: int, link: Any, used: dict[tuple[str, str], int | None]) -> None:
    conversion = read.conversion
    base: Location = ("topology", "links", index)
    line = read.line(*base)
    kind = link.get("type", "veth") if isinstance(link, Mapping) else "veth"
    if kind != "veth":
        conversion.report(line, f"link {index + 1}: type {kind}",
                          "only point-to-point cables between two nodes are made")  # fmt: skip
        return
    if not isinstance(link, Mapping) or not isinstance(link.get("endpoints"), list):
        conversion.error(line, f"links[{index}]", "a link has endpoints: [A:IF, B:IF]")
        return
    for key in link:
        if key not in ("endpoints", "type"):
            conversion.report(read.line(*base, key), f"link {index + 1}: {key}",
                              "not a qlink setting")  # fmt: skip
    ends = link["endpoints"]
    if len(ends) != 2:
        conversion.error(line, f"links[{index}].endpoints", "a cable has exactly two ends")
        return
    parsed = [_endpoint(read, raw, (*base, "endpoints", i)) for i, raw in enumerate(ends)]
    if parsed[0] is None or parsed[1] is None:
        return
    (a_node, a_if, a_mac, a_raw), (b_node, b_if, b_mac, b_raw) = parsed[0], parsed[1]
    fake = [n for n in (a_node, b_node) if conversion.nodes[n].fields.get("_fake")]
    if fake:
        conversion.report(line, f"link {a_raw} -- {b_raw}", f"not made ({fake[0]} is not a VM)")
        return
    ends = ((a_raw, a_node, a_if), (b_raw, b_node, b_if))
    renamed = [f"{raw} here is {n}:{name}" for raw, n, name in ends if raw != f"{n}:{name}"]
    imported = ImportedLink((a_node, a_if), (b_node, b_if), line, (a_mac, b_mac))
    imported.comment = "; ".join(renamed)
    if a_node == b_node:
        imported.comment = "; ".join([*renamed, "two ports of one node, cabled to each other"])
    conversion.add_link(imported, used)
