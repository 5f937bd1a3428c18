"""The topology file: parse YAML, validate it, and say exactly where it is wrong.

Parsing keeps the line of every key and item so that every error, whether pydantic's (a field
of the wrong type) or ours (a link to an unknown node), names the file, the line and the field.
Nothing here touches the host beyond reading the one file it is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
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

from qlink.errors import ConfigError, ConfigIssue

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

# Options whose value qlink writes itself: a user's extra_args may not repeat or override them.
OWNED_OPTIONS = frozenset(
    {
        "name", "nodefaults", "no-user-config", "display", "nographic", "machine", "M",
        "accel", "enable-kvm", "cpu", "smp", "m", "kernel", "initrd", "append", "chardev",
        "mon", "qmp", "qmp-pretty", "monitor", "serial", "pidfile", "msg", "netdev", "nic",
        "net", "daemonize", "runas", "chroot", "run-with", "action", "no-shutdown",
        "no-reboot",
    }
)  # fmt: skip


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class NodeSettings(_Strict):
    """Any node field; `defaults` holds one, and each node overrides it field by field."""

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
    extra_args: tuple[str, ...] | None = None

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

    @field_validator("extra_args")
    @classmethod
    def _extra_args_not_owned(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for arg in value or ():
            if arg.startswith("-") and arg.lstrip("-") in OWNED_OPTIONS:
                raise ValueError(f"{arg} is an option qlink writes itself; it cannot be overridden")
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
    """A point-to-point cable; `ports` fixes each end's local UDP port, in endpoint order."""

    endpoints: tuple[Endpoint, Endpoint]
    ports: tuple[UdpPort, UdpPort] | None = None

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
    defaults: NodeSettings = NodeSettings()
    nodes: dict[NodeName, NodeSettings] = Field(min_length=1)
    links: tuple[Link, ...] = ()
    carrier_follows_peer: bool = Field(
        default=True,
        description="a node that stops takes its peers' ports down, as a rebooting switch does",
    )

    @field_validator("nodes", mode="before")
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
    extra_args: tuple[str, ...]


class Lab(_Strict):
    """A validated lab: the single input of the plan."""

    name: LabName
    source: str = Field(description="the file the lab was read from, for messages")
    nodes: dict[str, Node]
    links: tuple[Link, ...]
    carrier_follows_peer: bool = True

    def link_of(self, node: str, interface: str) -> Link | None:
        for link in self.links:
            if any(end.node == node and end.interface == interface for end in link.endpoints):
                return link
        return None

    def interfaces(self, node: str) -> list[str]:
        """The node's interface names, in the order of the file's links."""
        return [end.interface for link in self.links for end in link.endpoints if end.node == node]


# --- loading ----------------------------------------------------------------------------


Location = tuple[str | int, ...]


class _Mapping(dict[Any, Any]):
    """A YAML mapping that knows the line of each of its keys."""

    __slots__ = ("lines",)
    lines: dict[Any, int]


class _Sequence(list[Any]):
    """A YAML sequence that knows the line of each of its items."""

    __slots__ = ("lines",)
    lines: list[int]


try:
    # libyaml's parser, which PyYAML's wheels carry: ruamel.yaml (pure Python since 0.19)
    # took 0.6 s to parse a 200-node lab, some 8% of bringing it up; libyaml takes 0.03 s.
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # a PyYAML built without libyaml: the same, in Python
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _TopologyLoader(_SafeLoader):
    """YAML 1.2's core schema, as the format promises (`on`, `no` and `2024-01-01` are
    strings, `010` is ten; PyYAML's own resolvers are YAML 1.1's); every mapping and sequence
    remembers its lines; a key given twice in one mapping is an error, not a silent override.
    """

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}  # noqa: RUF012


for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    # int before float: the first resolver that matches wins, and "10" matches both.
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (
        "float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("merge", r"<<", "<"),  # `<<: *defaults`
):
    _TopologyLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first)
    )


def _construct_int(loader: _TopologyLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # a leading zero is decimal in YAML 1.2


def _key(loader: _TopologyLoader, key_node: yaml.Node) -> Any:
    key = loader.construct_object(key_node, deep=True)
    try:
        hash(key)
    except TypeError as error:
        raise yaml.constructor.ConstructorError(
            None, None, "a mapping key must be a plain value", key_node.start_mark
        ) from error
    return key


def _construct_mapping(loader: _TopologyLoader, node: yaml.MappingNode) -> _Mapping:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = _key(loader, key_node)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first_line[key]})",
                key_node.start_mark,
            )  # fmt: skip
        first_line[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)  # merged keys first, so the mapping's own keys win
    mapping = _Mapping()
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = _key(loader, key_node)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader: _TopologyLoader, node: yaml.SequenceNode) -> _Sequence:
    sequence = _Sequence(loader.construct_object(item, deep=True) for item in node.value)
    sequence.lines = [item.start_mark.line + 1 for item in node.value]
    return sequence


_TopologyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_TopologyLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_TopologyLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


class _Positions:
    """Finds the line of a field path in the parsed YAML document."""

    def __init__(self, document: Any) -> None:
        self._document = document

    def line_of(self, location: Location) -> int | None:
        node: Any = self._document
        line: int | None = 1
        for part in location:
            if isinstance(node, _Mapping):
                key = part
                if key == "[key]":  # pydantic's marker for "the dict key itself"
                    continue
                if key not in node:
                    continue
                line = node.lines[key]
                node = node[key]
            elif isinstance(node, _Sequence) and isinstance(part, int):
                if part >= len(node):
                    break
                line = node.lines[part]
                node = node[part]
            # Otherwise the model looks at the data through a different shape (the short link
            # form has no `endpoints` key): skip the part and keep the closest line found.
        return line


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
    text: str, source: str, file_exists: Callable[[str], bool] | None = None
) -> Lab:
    """Validate topology text; `source` names it in errors and anchors relative paths.

    With `file_exists`, a kernel, initrd or image that is not there is an error at the line
    that names it; without, the files are not looked at.
    """
    try:
        document = yaml.load(text, Loader=_TopologyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue(source, line, "", f"not valid YAML: {error.problem or error.context}")]
        ) from error
    except yaml.YAMLError as error:  # a character YAML does not allow: no mark, a position
        raise ConfigError([ConfigIssue(source, None, "", f"not valid YAML: {error}")]) from error
    positions = _Positions(document)
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
    lab = _resolve(topology, source)
    if file_exists is not None:
        problems += _missing_files(topology, lab, file_exists)
    if problems:
        raise ConfigError(
            [
                ConfigIssue(source, positions.line_of(location), _field_path(location), message)
                for location, message in problems
            ]
        )
    return lab


def load_topology(path: str | Path, file_exists: Callable[[str], bool] | None = None) -> Lab:
    """Read and validate a topology file (see `parse_topology_text`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([ConfigIssue(str(path), None, "", f"cannot read: {error}")]) from error
    return parse_topology_text(text, str(path), file_exists)


def _plain(value: Any) -> Any:
    """The parsed document as plain dicts and lists, for pydantic."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _cross_check(topology: Topology) -> Iterator[tuple[Location, str]]:
    """Rules that span fields: each yields the location to blame and what is wrong."""
    used_interfaces: dict[tuple[str, str], Location] = {}
    used_ports: dict[int, Location] = {}
    for link_index, link in enumerate(topology.links):
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
        for end_index, port in enumerate(link.ports or ()):
            where = ("links", link_index, "ports", end_index)
            if port in used_ports:
                yield where, f"UDP port {port} is already used by {_field_path(used_ports[port])}"
            else:
                used_ports[port] = where
    for name, settings in topology.nodes.items():
        merged = _merge(topology.defaults, settings)
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


def _merge(defaults: NodeSettings, settings: NodeSettings) -> NodeSettings:
    return NodeSettings.model_validate(
        BUILTIN_DEFAULTS.model_dump(exclude_none=True)
        | defaults.model_dump(exclude_unset=True)
        | settings.model_dump(exclude_unset=True)
    )


def _anchor(path: str | None, base: Path) -> str | None:
    """Relative paths in a topology are relative to the file, as in a compose file."""
    if path is None:
        return None
    expanded = Path(path).expanduser() if path.startswith("~") else Path(path)
    return str(expanded if expanded.is_absolute() else base / expanded)


def _resolve(topology: Topology, source: str) -> Lab:
    base = Path(source).parent if source else Path(".")
    base = base if base.is_absolute() else Path.cwd() / base
    nodes: dict[str, Node] = {}
    for name, settings in topology.nodes.items():
        merged = _merge(topology.defaults, settings)
        fields = merged.model_dump()
        for path_field in ("kernel", "initrd", "image"):
            fields[path_field] = _anchor(fields[path_field], base)
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
