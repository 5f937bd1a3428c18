"""The plan of a lab: every node's NICs, MACs, PCI places, ports and paths.

`plan_lab(lab, layout, previous)` is a pure function: the same inputs give the same plan, and
the previous allocations are an input, so nothing remembered is hidden in the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from qlink.dayzero import Interface, Seed
from qlink.errors import ConfigError, ConfigIssue, PlanError
from qlink.plan.allocations import (
    DEFAULT_SSH_PORTS,
    DEFAULT_UDP_PORTS,
    Allocations,
    PortRequest,
    allocate_ports,
    port_key,
)
from qlink.plan.identity import (
    MGMT_KEY,
    PciPlace,
    assign_positions,
    bridges_needed,
    kind_position,
    mac_address,
    place_of,
)
from qlink.plan.node_paths import NodePaths
from qlink.plan.paths import Layout
from qlink.plan.seeds import seed_of
from qlink.topology import Endpoint, Lab, Node

LOOPBACK = "127.0.0.1"

NIC_FD_BASE = 100
"""A data NIC's socket is descriptor `NIC_FD_BASE + position` in its QEMU (see `NicPlan.fd`):
positions 0..867 give 100..967, below the soft RLIMIT_NOFILE of 1024 that shells and services
start with (the launch checks the limit all the same). A fixed number keeps the argv a pure
function of the plan, so a restarted or re-adopted QEMU has the command line recorded for it."""


@dataclass(frozen=True, slots=True)
class NicPlan:
    """One data interface: its identity and both ends of its UDP tunnel."""

    interface: str
    mac: str
    position: int
    place: PciPlace
    local_port: int
    remote_port: int
    peer: Endpoint
    local_address: str = LOOPBACK
    remote_address: str = LOOPBACK

    @property
    def netdev_id(self) -> str:
        # QEMU ids must start with a letter; interface names may start with a digit.
        return f"net-{self.interface}"

    @property
    def device_id(self) -> str:
        return f"nic-{self.interface}"

    @property
    def fd(self) -> int:
        """The descriptor number at which QEMU finds this NIC's socket, which qlink opens
        (bound to the local end, connected to the peer's) and hands over at launch."""
        return NIC_FD_BASE + self.position


@dataclass(frozen=True, slots=True)
class MgmtPlan:
    """The management NIC: user-mode networking, the guest's SSH on a loopback port."""

    mac: str
    ssh_port: int
    ssh_credential: Path
    """Root's authorized keys as an SMBIOS OEM string (see `Layout.ssh_credential`)."""
    host_address: str = LOOPBACK

    netdev_id = "mgmt"
    device_id = "nic-mgmt"


@dataclass(frozen=True, slots=True)
class NodePlan:
    lab: str
    node: Node
    nics: tuple[NicPlan, ...]
    """In position order, which is the guest's port order."""
    bridges: int
    mgmt: MgmtPlan | None
    paths: NodePaths
    seed: Seed | None = None
    """The node's day-0 NoCloud documents, when its file gives any (`plan/seeds.py`)."""

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def held(self) -> bool:
        """QEMU starts with its CPUs stopped (`-S`) and qlinkd runs them (`cont`) once the
        starts beside it are done (`runtime/hold.py`); not a node whose `extra_args` give
        `-S` itself: that one is meant to stay paused."""
        return "-S" not in self.node.extra_args

    def udp_ports(self) -> list[int]:
        return [nic.local_port for nic in self.nics]

    def nic(self, interface: str) -> NicPlan:
        for nic in self.nics:
            if nic.interface == interface:
                return nic
        raise KeyError(interface)


@dataclass(frozen=True, slots=True)
class LinkPlan:
    a: Endpoint
    b: Endpoint
    a_port: int
    b_port: int


@dataclass(frozen=True, slots=True)
class LabPlan:
    name: str
    source: str
    nodes: dict[str, NodePlan]
    links: tuple[LinkPlan, ...]


def _link_ends(lab: Lab) -> Iterator[tuple[int, int, Endpoint, Endpoint, int | None]]:
    """(link index, end index, end, peer, fixed port) in the file's order."""
    for index, link in enumerate(lab.links):
        first, second = link.endpoints
        fixed = link.ports or (None, None)
        yield index, 0, first, second, fixed[0]
        yield index, 1, second, first, fixed[1]


def _canonical_order(lab: Lab) -> list[tuple[int, int, Endpoint, Endpoint, int | None]]:
    # A fresh allocation follows the sorted link ends, not the file's order, so reordering
    # links never moves a port even without memory; the two ends of a link stay adjacent.
    def link_key(end: tuple[int, int, Endpoint, Endpoint, int | None]) -> tuple[str, str]:
        _, _, this, peer, _ = end
        ends = sorted((str(this), str(peer)))
        return ends[0], str(this)

    return sorted(_link_ends(lab), key=link_key)


def plan_lab(
    lab: Lab,
    layout: Layout,
    previous: Allocations | None = None,
    *,
    udp_pool: range = DEFAULT_UDP_PORTS,
    ssh_pool: range = DEFAULT_SSH_PORTS,
    busy_udp: frozenset[int] = frozenset(),
    busy_tcp: frozenset[int] = frozenset(),
) -> tuple[LabPlan, Allocations]:
    """Plan every node of `lab`; return the plan and the allocations to remember.

    `busy_udp` and `busy_tcp` are ports the host has in use right now (the daemon looks them
    up): new allocations avoid them.
    """
    previous = previous or Allocations()
    elsewhere = previous.other_labs(lab.name)

    ends = _canonical_order(lab)
    udp_ports = allocate_ports(
        (
            PortRequest(
                port_key(lab.name, end.node, end.interface),
                fixed,
                f"link {index + 1} end {end} in {lab.source}",
            )
            for index, _, end, _, fixed in ends
        ),
        remembered=previous.of_lab(lab.name, previous.udp_ports),
        held_elsewhere=elsewhere.udp_ports,
        pool=udp_pool,
        kind="UDP",
        avoid=busy_udp,
    )
    ssh_ports = allocate_ports(
        (
            PortRequest(port_key(lab.name, name, "ssh"), None, f"management SSH of node {name}")
            for name, node in sorted(lab.nodes.items())
            if node.mgmt
        ),
        remembered=previous.of_lab(lab.name, previous.ssh_ports),
        held_elsewhere=elsewhere.ssh_ports,
        pool=ssh_pool,
        kind="TCP",
        avoid=busy_tcp,
    )

    fixed_macs = lab.fixed_macs()
    avoid = frozenset(fixed_macs.values())
    positions: dict[str, int] = {}
    nodes: dict[str, NodePlan] = {}
    day0_issues: list[ConfigIssue] = []
    for name, node in lab.nodes.items():
        interfaces = lab.interfaces(name)
        remembered = {
            interface: position
            for interface in interfaces
            if (position := previous.positions.get(port_key(lab.name, name, interface))) is not None
        }
        try:
            node_positions = assign_positions(
                interfaces,
                remembered,
                partial(kind_position, naming=node.ports, mgmt_port=node.mgmt_port),
            )
        except ValueError as error:
            raise PlanError(f"node {name} of {lab.source}: {error}") from error
        positions.update(
            {port_key(lab.name, name, iface): pos for iface, pos in node_positions.items()}
        )
        nics = []
        for _, _, end, peer, _ in _link_ends(lab):
            if end.node != name:
                continue
            nics.append(
                NicPlan(
                    interface=end.interface,
                    mac=fixed_macs.get((name, end.interface))
                    or mac_address(lab.name, name, end.interface, avoid),
                    position=node_positions[end.interface],
                    place=place_of(node_positions[end.interface]),
                    local_port=udp_ports[port_key(lab.name, name, end.interface)],
                    remote_port=udp_ports[port_key(lab.name, peer.node, peer.interface)],
                    peer=peer,
                )
            )
        nics.sort(key=lambda nic: nic.position)
        mgmt = (
            MgmtPlan(
                mac=mac_address(lab.name, name, MGMT_KEY, avoid),
                ssh_port=ssh_ports[port_key(lab.name, name, "ssh")],
                ssh_credential=layout.ssh_credential,
            )
            if node.mgmt
            else None
        )
        paths = layout.node(lab.name, name)
        if too_long := paths.too_long_sockets():
            raise PlanError(
                f"socket path {too_long[0]} is longer than the 107 bytes a unix socket allows: "
                "use a shorter --root, lab name or node name"
            )
        nodes[name] = NodePlan(
            lab=lab.name,
            node=node,
            nics=tuple(nics),
            bridges=bridges_needed(node_positions.values()),
            mgmt=mgmt,
            paths=paths,
            seed=_seed(lab.name, node, nics, day0_issues),
        )
    if day0_issues:
        raise ConfigError(day0_issues)
    _refuse_mac_collisions(nodes)

    links = tuple(
        LinkPlan(
            a=link.endpoints[0],
            b=link.endpoints[1],
            a_port=udp_ports[
                port_key(lab.name, link.endpoints[0].node, link.endpoints[0].interface)
            ],
            b_port=udp_ports[
                port_key(lab.name, link.endpoints[1].node, link.endpoints[1].interface)
            ],
        )
        for link in lab.links
    )
    remembered_now = Allocations(
        udp_ports=elsewhere.udp_ports | udp_ports,
        ssh_ports=elsewhere.ssh_ports | ssh_ports,
        positions=elsewhere.positions | positions,
    )
    return LabPlan(lab.name, lab.source, nodes, links), remembered_now


def _seed(lab: str, node: Node, nics: list[NicPlan], issues: list[ConfigIssue]) -> Seed | None:
    """The node's seed; its template errors join `issues`, so that every node's are told."""
    interfaces = [
        Interface(nic.interface, nic.mac, nic.peer.node, nic.peer.interface, nic.position)
        for nic in nics
    ]
    try:
        return seed_of(lab, node, interfaces)
    except ConfigError as error:
        issues.extend(error.issues)
        return None


def _refuse_mac_collisions(nodes: dict[str, NodePlan]) -> None:
    seen: dict[str, str] = {}
    for plan in nodes.values():
        named = [(nic.mac, f"{plan.name}:{nic.interface}") for nic in plan.nics]
        if plan.mgmt is not None:
            named.append((plan.mgmt.mac, f"{plan.name} management NIC"))
        for mac, owner in named:
            if mac in seen:
                raise PlanError(f"MAC {mac} is both {seen[mac]}'s and {owner}'s")
            seen[mac] = owner
