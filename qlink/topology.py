"""The topology file's models: validate the file, and say exactly where it is wrong.

The pydantic models, the rules for names, the rules that span fields (cross-checks), and the
merge of defaults into each node that makes the validated `Lab`. Parsing (`yamlload.py`) keeps
the line of every key and item so that every error, whether pydantic's (a field of the wrong
type) or ours (a link to an unknown node), names the file, the line and the field; QEMU's own
limits on a node are checked by `limits.py`. Nothing here touches the host beyond reading the
one file it is given.

The file may come from anyone who can reach the control socket, so its size is bounded here
and what its YAML composes in `yamlload.py`, with fixed limits far above any real lab.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from qlink import bootorder
from qlink.errors import ConfigError, ConfigIssue
from qlink.guestspec import DayZero, Readiness, day_zero_of
from qlink.impairment import LinkImpairment
from qlink.limits import HostResources, beyond_host, beyond_qemu
from qlink.screen import screen_extra_args
from qlink.sourcefile import check_text, read_topology_text
from qlink.yamlload import Location, Positions, load_document

# Names end up inside QEMU's comma-separated options, file paths and log lines: allow-list them.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_LAB_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# NICs sit at fixed PCIe addresses on the q35 root bus, so only the q35 family is accepted.
_MACHINE_RE = re.compile(r"q35|pc-q35-[0-9.]+")
# A CPU model, optionally with QEMU feature flags (`max,+x2apic,-svm`).
_CPU_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(?:,[+-]?[A-Za-z0-9_.-]+(?:=[A-Za-z0-9_.-]+)?)*")

MAX_LAB_NAME = 32
MAX_NODE_NAME = 63  # one DNS label: nodes become guest host names
MAX_INTERFACE_NAME = 15  # Linux IFNAMSIZ - 1: guests use the name as their port name

Accel = Literal["auto", "kvm", "tcg"]
ResolvedAccel = Literal["kvm", "tcg"]
NicModel = Literal["virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3"]
RestartPolicy = Literal["always", "on-failure", "never"]


def _check_name(value: str, pattern: re.Pattern[str], limit: int, what: str) -> str:
    if not pattern.fullmatch(value):
        allowed = (
            "lowercase letters, digits and '-'"
            if pattern is _LAB_NAME_RE
            else "letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
        raise ValueError(f"bad {what} name {value!r}: use {allowed}")
    if len(value) > limit:
        raise ValueError(f"{what} name {value!r} is longer than {limit} characters")
    return value


def _lab_name(value: str) -> str:
    return _check_name(value, _LAB_NAME_RE, MAX_LAB_NAME, "lab")


def _node_name(value: str) -> str:
    return _check_name(value, _NAME_RE, MAX_NODE_NAME, "node")


def _interface_name(value: str) -> str:
    return _check_name(value, _NAME_RE, MAX_INTERFACE_NAME, "interface")


LabName = Annotated[str, AfterValidator(_lab_name)]
NodeName = Annotated[str, AfterValidator(_node_name)]
InterfaceName = Annotated[str, AfterValidator(_interface_name)]
UdpPort = Annotated[int, Field(ge=1, le=65535)]
CarrierFollows = bool | Literal["ready"]

_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}")


def _mac(value: str) -> str:
    """A fixed MAC: six octets, unicast (a multicast source address is dropped by every
    bridge and switch), not all zeros; written back as lowercase with colons."""
    if not _MAC_RE.fullmatch(value):
        raise ValueError(f"bad MAC address {value!r}: write six octets, e.g. 44:38:39:00:00:01")
    octets = [int(part, 16) for part in re.split("[:-]", value)]
    if octets[0] & 1:
        raise ValueError(f"MAC address {value!r} is multicast (first octet odd): use unicast")
    if not any(octets):
        raise ValueError("MAC address 00:00:00:00:00:00 is not a usable address")
    return ":".join(f"{octet:02x}" for octet in octets)


MacAddress = Annotated[str, AfterValidator(_mac)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PortNaming(_Strict):
    """How a network OS names its data ports: `prefix` then a number, the first data port
    numbered `first`, the next ones `step` apart (SONiC: Ethernet0, Ethernet4, ...)."""

    prefix: InterfaceName
    first: Annotated[int, Field(ge=0)] = 0
    step: PositiveInt = 1

    @field_validator("prefix")
    @classmethod
    def _no_digit_at_the_end(cls, value: str) -> str:
        if value[-1].isdigit():
            raise ValueError("a prefix ending in a digit makes port numbers ambiguous")
        return value


Stage = Literal["oob-mgmt", "exit", "superspine", "spine", "leaf", "tor", "host"]
STAGE_ORDER: tuple[Stage, ...] = ("oob-mgmt", "exit", "superspine", "spine", "leaf", "tor", "host")
"""The named stages in boot order (a lab's out-of-band management first, hosts last), as
topology_converter orders its `function`s; a number is a stage too, and names count as
10, 20, ... 70, so numbers can go between them."""


class NodeSettings(_Strict):
    """Any node field; `defaults` holds one, and each node overrides it field by field."""

    kind: NodeName | None = Field(
        default=None, description="a preset from `kinds:` or a built-in kind (qlink/kinds.py)"
    )

    memory: PositiveInt | None = Field(default=None, description="MiB of guest RAM")
    cpus: PositiveInt | None = None
    accel: Accel | None = None
    machine: str | None = None
    cpu: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    image: str | None = None
    nic_model: NicModel | None = None
    mgmt: bool | None = Field(
        default=None, description="a user-mode NIC with the guest's SSH on a host port"
    )
    restart: RestartPolicy | None = None
    ready: Readiness | None = Field(
        default=None, description="when the guest counts as ready: {console: REGEX}"
    )
    cloud_init: str | dict[str, Any] | None = Field(
        default=None, description="day-0 user-data: a mapping, a block of text, or a file"
    )
    network_config: str | dict[str, Any] | None = None
    vars: dict[str, Any] | None = Field(
        default=None, description="template values for day-0 documents (node over defaults)"
    )
    extra_args: tuple[str, ...] | None = Field(
        default=None,
        description="QEMU options appended last, screened against what qlink owns "
        "(qlink/screen.py)",
    )
    ports: PortNaming | None = Field(
        default=None, description="how the guest names its data ports, which fixes their order"
    )
    mgmt_port: InterfaceName | None = Field(
        default=None,
        description="the guest's name for its first NIC, which it keeps for management",
    )
    stage: Stage | Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="boot stage: every node of an earlier stage is ready first"
    )
    depends_on: tuple[NodeName, ...] | None = Field(
        default=None, description="nodes that must be ready before this one starts"
    )

    @field_validator("machine")
    @classmethod
    def _machine_is_plain(cls, value: str | None) -> str | None:
        if value is not None and not _MACHINE_RE.fullmatch(value):
            raise ValueError(
                f"machine {value!r} is not supported: qlink places NICs at fixed PCIe addresses "
                "and needs q35 (or a versioned pc-q35-X.Y)"
            )
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu_is_plain(cls, value: str | None) -> str | None:
        if value is not None and not _CPU_RE.fullmatch(value):
            raise ValueError(f"bad CPU model {value!r}: a model name, then ,+flag or ,-flag")
        return value

    @field_validator("kernel", "initrd", "image", "append")
    @classmethod
    def _no_control_characters(cls, value: str | None) -> str | None:
        if value is not None and any(ord(char) < 32 for char in value):
            raise ValueError("control characters are not allowed")
        if value is not None and value == "":
            raise ValueError("must not be empty")
        return value


BUILTIN_DEFAULTS = NodeSettings(
    memory=512,
    cpus=1,
    accel="auto",
    machine="q35",
    nic_model="virtio-net-pci",
    mgmt=False,
    restart="on-failure",
    extra_args=(),
)


class Endpoint(_Strict):
    """One end of a cable: `node:interface`."""

    node: NodeName
    interface: InterfaceName

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            node, sep, interface = data.partition(":")
            if not sep or ":" in interface:
                raise ValueError(f"endpoint {data!r} must be written node:interface")
            return {"node": node, "interface": interface}
        return data

    def __str__(self) -> str:
        return f"{self.node}:{self.interface}"


class Link(_Strict):
    """A point-to-point cable; `ports` fixes each end's local UDP port and `macs` each end's
    MAC address (null: derived), in endpoint order."""

    endpoints: tuple[Endpoint, Endpoint]
    ports: tuple[UdpPort, UdpPort] | None = None
    impair: LinkImpairment | None = Field(
        default=None, description="delay, loss, rate...: both directions, or a_to_b / b_to_a"
    )
    macs: tuple[MacAddress | None, MacAddress | None] | None = None

    @property
    def key(self) -> str:
        """The cable's name whichever way round it is written: `a:swp1--b:swp1`."""
        return "--".join(sorted(str(end) for end in self.endpoints))

    def peer_of(self, node: str, interface: str) -> Endpoint:
        first, second = self.endpoints
        return second if (first.node, first.interface) == (node, interface) else first

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, data: Any) -> Any:
        # The short form `[a:swp1, b:swp1]` is a bare list of the two endpoints.
        if isinstance(data, list | tuple):
            return {"endpoints": data}
        return data


class Topology(_Strict):
    """The file as written: what the user asked for, before defaults are applied."""

    name: LabName
    kinds: dict[NodeName, NodeSettings] = Field(
        default={}, description="named node presets; one named as a built-in kind extends it"
    )
    defaults: NodeSettings = NodeSettings()
    nodes: dict[NodeName, NodeSettings] = Field(min_length=1)
    links: tuple[Link, ...] = ()
    carrier_follows_peer: CarrierFollows = Field(
        default=True,
        description="true: a node that stops takes its peers' ports down, as a switch that "
        "powers off does; `ready`: also while it is not ready (booting, or rebooting by "
        "itself: its QEMU stays, its guest resets), as a rebooting switch does; false: never",
    )

    @cached_property
    def merged(self) -> dict[str, NodeSettings]:
        """Each node's settings with qlink's defaults, `defaults` and its kind applied
        (`_merge`), made once: every cross-check reads them."""
        return {name: _merge(self, settings) for name, settings in self.nodes.items()}

    @field_validator("nodes", "kinds", mode="before")
    @classmethod
    def _empty_node_is_default(cls, value: Any) -> Any:
        # `spine1:` with nothing after it means "all defaults".
        if isinstance(value, Mapping):
            return {name: {} if body is None else body for name, body in value.items()}
        return value


class Node(_Strict):
    """A node with defaults applied: every field the plan needs is known."""

    name: NodeName
    memory: PositiveInt
    cpus: PositiveInt
    accel: Accel
    machine: str
    cpu: str | None
    kernel: str | None
    initrd: str | None
    append: str | None
    image: str | None
    nic_model: NicModel
    mgmt: bool
    restart: RestartPolicy
    ready: Readiness | None = None
    day0: DayZero | None = None
    extra_args: tuple[str, ...]
    kind: str | None = None
    ports: PortNaming | None = None
    mgmt_port: str | None = None
    stage: Stage | int | None = None
    depends_on: tuple[str, ...] = ()

    @property
    def stage_rank(self) -> int | None:
        return self.rank_of(self.stage)

    @staticmethod
    def rank_of(stage: str | int | None) -> int | None:
        """The stage as a number: names count 10, 20, ... in `STAGE_ORDER`."""
        if isinstance(stage, str):
            return 10 * (STAGE_ORDER.index(stage) + 1)
        return stage


class Lab(_Strict):
    """A validated lab: the single input of the plan."""

    name: LabName
    source: str = Field(description="the file the lab was read from, for messages")
    nodes: dict[str, Node]
    links: tuple[Link, ...]
    carrier_follows_peer: CarrierFollows = True

    def link_of(self, node: str, interface: str) -> Link | None:
        for link in self.links:
            if any(end.node == node and end.interface == interface for end in link.endpoints):
                return link
        return None

    def boot_waits(self) -> dict[str, frozenset[str]]:
        """{node: the nodes that must be ready before it starts} (qlink/bootorder.py)."""
        return bootorder.waits(
            {
                name: bootorder.Order(node.stage_rank, node.depends_on)
                for name, node in self.nodes.items()
            }
        )

    def interfaces(self, node: str) -> list[str]:
        """The node's interface names, in the order of the file's links."""
        return [end.interface for link in self.links for end in link.endpoints if end.node == node]

    def fixed_macs(self) -> dict[tuple[str, str], str]:
        """{(node, interface): MAC} of every link end the file gives a MAC."""
        return {
            (end.node, end.interface): mac
            for link in self.links
            for end, mac in zip(link.endpoints, link.macs or (None, None), strict=True)
            if mac is not None
        }


def _field_path(location: Location) -> str:
    parts: list[str] = []
    for part in location:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part == "[key]":
            continue
        elif parts:
            parts.append(f".{part}")
        else:
            parts.append(str(part))
    return "".join(parts)


def _pydantic_message(error: Mapping[str, Any]) -> str:
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown field"
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _user_location(location: Location) -> Location:
    # pydantic names the tried union member or the "before" function in the path;
    # neither is something the user wrote.
    return tuple(
        part
        for part in location
        if isinstance(part, int)
        or not (part.startswith(("function-", "json-")) or "[" in part)
        or part == "[key]"
    )


def parse_topology_text(
    text: str,
    source: str,
    file_exists: Callable[[str], bool] | None = None,
    host: HostResources | None = None,
) -> Lab:
    """Validate topology text; `source` names it in errors and anchors relative paths.

    With `file_exists`, a kernel, initrd or image that is not there is an error at the line
    that names it; without, the files are not looked at. With `host`, so is a node asking
    for more memory or CPUs than the host has, or an image that cannot back an overlay.
    """
    check_text(text, source)
    document, positions = load_document(text, source)
    if not isinstance(document, Mapping):
        raise ConfigError([ConfigIssue(source, 1, "", "a topology must be a YAML mapping")])
    try:
        topology = Topology.model_validate(_plain(document))
    except ValidationError as error:
        issues = []
        for item in error.errors():
            location = _user_location(item["loc"])
            issues.append(
                ConfigIssue(
                    source,
                    positions.line_of(location),
                    _field_path(location),
                    _pydantic_message(item),
                )
            )
        raise ConfigError(issues) from error
    problems = list(_cross_check(topology))
    lab = _with_day_zero(topology, _resolve(topology, source), positions, source, problems)
    if file_exists is not None:
        problems += _missing_files(topology, lab, file_exists)
    if host is not None:  # an image that is not there is reported once: by the file check
        problems += _beyond_host(topology, lab, host)
    if problems:
        raise ConfigError(
            [
                ConfigIssue(source, positions.line_of(location), _field_path(location), message)
                for location, message in problems
            ]
        )
    return lab


def load_topology(
    path: str | Path,
    file_exists: Callable[[str], bool] | None = None,
    host: HostResources | None = None,
) -> Lab:
    """Read and validate a topology file (see `read_topology_text`, `parse_topology_text`)."""
    return parse_topology_text(read_topology_text(path), str(path), file_exists, host)


def _beyond_host(topology: Topology, lab: Lab, host: HostResources) -> list[tuple[Location, str]]:
    return [
        problem
        for name, settings in topology.nodes.items()
        for problem in beyond_host(
            name, settings, topology.merged[name], lab.nodes[name].image, host
        )
    ]


def _plain(value: Any) -> Any:
    """The parsed document as plain dicts and lists, for pydantic."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _cross_check(topology: Topology) -> Iterator[tuple[Location, str]]:
    """Rules that span fields: each yields the location to blame and what is wrong."""
    yield from _links_connect_once(topology)
    yield from _extra_args_screened(topology)
    yield from _kinds_known(topology)
    yield from _boot_order_acyclic(topology)
    for name, settings in topology.nodes.items():
        merged = topology.merged[name]
        yield from beyond_qemu(name, settings, merged)
        yield from _boots_one_way(name, merged)


def _links_connect_once(topology: Topology) -> Iterator[tuple[Location, str]]:
    """Each link end is a known node's interface, and no interface or UDP port is used twice."""
    used_interfaces: dict[tuple[str, str], Location] = {}
    used_ports: dict[int, Location] = {}
    used_macs: dict[str, Location] = {}
    for link_index, link in enumerate(topology.links):
        yield from _ends_known_and_free(topology, link_index, link, used_interfaces)
        yield from _ports_free(link_index, link, used_ports)
        yield from _macs_free(link_index, link, used_macs)


def _ends_known_and_free(
    topology: Topology,
    link_index: int,
    link: Link,
    used_interfaces: dict[tuple[str, str], Location],
) -> Iterator[tuple[Location, str]]:
    """The link's ends name known nodes and interfaces no earlier end took (recorded here)."""
    for end_index, end in enumerate(link.endpoints):
        where: Location = ("links", link_index, "endpoints", end_index)
        if end.node not in topology.nodes:
            yield where, f"unknown node {end.node!r} (nodes: {', '.join(topology.nodes)})"
            continue
        key = (end.node, end.interface)
        if key in used_interfaces:
            first = _field_path(used_interfaces[key])
            yield where, f"interface {end} is already used by {first}"
        else:
            used_interfaces[key] = where


def _ports_free(
    link_index: int, link: Link, used_ports: dict[int, Location]
) -> Iterator[tuple[Location, str]]:
    """The link's fixed UDP ports are ones no earlier link took (recorded here)."""
    for end_index, port in enumerate(link.ports or ()):
        where: Location = ("links", link_index, "ports", end_index)
        if port in used_ports:
            yield where, f"UDP port {port} is already used by {_field_path(used_ports[port])}"
        else:
            used_ports[port] = where


def _macs_free(
    link_index: int, link: Link, used_macs: dict[str, Location]
) -> Iterator[tuple[Location, str]]:
    """The link's fixed MACs are ones no earlier end took (recorded here): two NICs with one
    MAC in one lab confuse every switch and ARP cache between them."""
    for end_index, mac in enumerate(link.macs or ()):
        if mac is None:
            continue
        where: Location = ("links", link_index, "macs", end_index)
        if mac in used_macs:
            yield where, f"MAC {mac} is already used by {_field_path(used_macs[mac])}"
        else:
            used_macs[mac] = where


def _kinds_known(topology: Topology) -> Iterator[tuple[Location, str]]:
    """Every `kind:` names a kind of the file or a built-in one; a kind names no kind."""
    from qlink.kinds import BUILTIN_KINDS  # noqa: PLC0415 (kinds imports this module)

    known = sorted(set(topology.kinds) | set(BUILTIN_KINDS))
    written: list[tuple[Location, NodeSettings]] = [(("defaults",), topology.defaults)]
    written += [(("nodes", name), settings) for name, settings in topology.nodes.items()]
    for where, settings in written:
        if settings.kind is not None and kind_of(topology, settings.kind) is None:
            yield (*where, "kind"), f"unknown kind {settings.kind!r} (kinds: {', '.join(known)})"
    for name, kind in topology.kinds.items():
        if kind.kind is not None:
            yield ("kinds", name, "kind"), "a kind cannot name another kind"
    ends: dict[str, list[tuple[Location, Endpoint]]] = defaultdict(list)
    for index, link in enumerate(topology.links):
        for end_index, end in enumerate(link.endpoints):
            ends[end.node].append((("links", index, "endpoints", end_index), end))
    for name in topology.nodes:
        yield from _ports_fit(name, topology.merged[name], ends.get(name, []))


def _ports_fit(
    name: str, merged: NodeSettings, ends: Sequence[tuple[Location, Endpoint]]
) -> Iterator[tuple[Location, str]]:
    """A node whose kind names its ports uses names that kind has; its management port is
    not cabled while qlink's management NIC takes that place."""
    from qlink.plan.identity import kind_position  # noqa: PLC0415 (plan imports this module)

    for where, end in ends:
        if end.interface == merged.mgmt_port and merged.mgmt:
            yield (
                where,
                (
                    f"{end} is {name}'s management port, which its management NIC (mgmt: true) "
                    "is: cable another port, or set mgmt: false"
                ),
            )
        elif merged.ports is not None and end.interface != merged.mgmt_port:
            naming = merged.ports
            number = end.interface.removeprefix(naming.prefix)
            if number.isdigit() and kind_position(end.interface, naming, None) is None:
                yield (
                    where,
                    (
                        f"{name} has no port {end.interface}: its ports are "
                        f"{naming.prefix}{naming.first}, {naming.prefix}"
                        f"{naming.first + naming.step}, ... ({merged.kind or 'ports'})"
                    ),
                )


def _boot_order_acyclic(topology: Topology) -> Iterator[tuple[Location, str]]:
    """`depends_on` names known nodes, and no node waits for itself through the others."""
    orders: dict[str, bootorder.Order] = {}
    for name in topology.nodes:
        merged = topology.merged[name]
        for index, other in enumerate(merged.depends_on or ()):
            if other not in topology.nodes:
                yield ("nodes", name, "depends_on", index), f"unknown node {other!r}"
        rank = Node.rank_of(merged.stage)
        orders[name] = bootorder.Order(rank, merged.depends_on or ())
    found = bootorder.cycle(bootorder.waits(orders))
    if found is not None:
        first = found[0]
        field = "depends_on" if topology.nodes[first].depends_on else "stage"
        where: Location = ("nodes", first, field)
        if getattr(topology.nodes[first], field) is None:
            where = ("nodes", first)
        yield where, f"boot order has a cycle: {' -> '.join(found)} (depends_on and stages)"


def _extra_args_screened(topology: Topology) -> Iterator[tuple[Location, str]]:
    """`extra_args` stay clear of what qlink owns (qlink/screen.py), item by item."""
    written: list[tuple[Location, NodeSettings]] = [(("defaults",), topology.defaults)]
    written += [(("nodes", name), settings) for name, settings in topology.nodes.items()]
    screened: dict[tuple[str, ...], list[tuple[int, str]]] = {}  # nodes often share one list
    for where, settings in written:
        # Screened where written, item by item: a node's list replaces the defaults' list.
        args = settings.extra_args or ()
        if args not in screened:
            screened[args] = screen_extra_args(args)
        for index, message in screened[args]:
            yield (*where, "extra_args", index), message


def _boots_one_way(name: str, merged: NodeSettings) -> Iterator[tuple[Location, str]]:
    """A node boots from a kernel or from a disk image, exactly one; initrd and append need
    the kernel."""
    if merged.kernel is None and merged.image is None:
        yield (
            ("nodes", name),
            "needs `kernel` (direct boot) or `image` (a disk), set here or in defaults",
        )
    elif merged.kernel is not None and merged.image is not None:
        yield ("nodes", name), "set either `kernel` or `image`, not both"
    if merged.kernel is None and (merged.initrd is not None or merged.append is not None):
        yield ("nodes", name), "`initrd` and `append` need `kernel`"


def _missing_files(
    topology: Topology, lab: Lab, file_exists: Callable[[str], bool]
) -> Iterator[tuple[Location, str]]:
    for name, node in lab.nodes.items():
        for field in ("kernel", "initrd", "image"):
            path = getattr(node, field)
            if path is None or file_exists(path):
                continue
            # Blame the line that wrote the path: the node's own, or the defaults'.
            set_on_node = getattr(topology.nodes[name], field) is not None
            where: Location = ("nodes", name, field) if set_on_node else ("defaults", field)
            yield where, f"no such file: {path}"


DAY_ZERO_FIELDS = {"cloud_init", "network_config", "vars"}


def _with_day_zero(
    topology: Topology, lab: Lab, positions: Positions, source: str, problems: list[Any]
) -> Lab:
    """The lab with each node's day-0 documents read and located (rendered by the plan)."""
    base = Path(source).parent if source else Path(".")
    base = base if base.is_absolute() else Path.cwd() / base
    nodes = dict(lab.nodes)
    for name, settings in topology.nodes.items():
        merged = topology.merged[name].model_dump(include=DAY_ZERO_FIELDS)
        # One level, as dayzero.merge_vars does (kept here: no Jinja2 import for validate).
        merged["vars"] = {**(topology.defaults.vars or {}), **(settings.vars or {})}
        own = settings.model_dump(include=DAY_ZERO_FIELDS)
        day0 = day_zero_of(name, own, merged, (positions, source, base), problems)
        if day0 is not None:
            nodes[name] = nodes[name].model_copy(update={"day0": day0})
    return lab.model_copy(update={"nodes": nodes})


def _merge(topology: Topology, settings: NodeSettings) -> NodeSettings:
    """A node's settings: qlink's defaults, then the file's `defaults`, then its kind's (a
    kind is chosen for this node, so it is more specific than the lab's defaults), then its
    own. An unknown kind adds nothing here; `_kinds_known` reports it."""
    kind_name = settings.kind or topology.defaults.kind
    kind = kind_of(topology, kind_name) if kind_name is not None else None
    return NodeSettings.model_validate(
        BUILTIN_DEFAULTS.model_dump(exclude_none=True)
        | topology.defaults.model_dump(exclude_unset=True)
        | (kind.model_dump(exclude_unset=True) if kind is not None else {})
        | settings.model_dump(exclude_unset=True)
    )


def kind_of(topology: Topology, name: str) -> NodeSettings | None:
    """The kind `name`: the file's, laid over the built-in kind of that name if any."""
    from qlink.kinds import builtin_kind  # noqa: PLC0415 (kinds imports this module)

    builtin = builtin_kind(name)
    own = topology.kinds.get(name)
    if builtin is None or own is None:
        return own or builtin
    return NodeSettings.model_validate(
        builtin.model_dump(exclude_unset=True) | own.model_dump(exclude_unset=True)
    )


def _anchor(path: str | None, base: Path) -> str | None:
    """Relative paths in a topology are relative to the file, as in a compose file."""
    if path is None:
        return None
    expanded = Path(path)
    if path.startswith("~"):
        # as a shell does, `~nosuchuser/disk` stays literal (and is then reported missing)
        with contextlib.suppress(RuntimeError, KeyError):
            expanded = expanded.expanduser()
    return str(expanded if expanded.is_absolute() else base / expanded)


def _resolve(topology: Topology, source: str) -> Lab:
    base = Path(source).parent if source else Path(".")
    base = base if base.is_absolute() else Path.cwd() / base
    nodes: dict[str, Node] = {}
    for name in topology.nodes:
        merged = topology.merged[name]
        fields = merged.model_dump(exclude=DAY_ZERO_FIELDS)
        for path_field in ("kernel", "initrd", "image"):
            fields[path_field] = _anchor(fields[path_field], base)
        fields["depends_on"] = fields["depends_on"] or ()
        nodes[name] = Node(name=name, **fields)
    return Lab(
        name=topology.name,
        source=source,
        nodes=nodes,
        links=topology.links,
        carrier_follows_peer=topology.carrier_follows_peer,
    )


def iter_endpoints(links: Sequence[Link]) -> Iterator[tuple[Endpoint, Endpoint]]:
    """Each link end with its peer, both directions."""
    for link in links:
        first, second = link.endpoints
        yield first, second
        yield second, first
