"""Stable identity: each interface's MAC address and guest-visible PCI place.

Both depend only on (lab, node, interface name). A restarted VM must come back with the same
MACs at the same PCI addresses, or its peers' ARP and LLDP caches point at a ghost and the
guest renumbers its ports.

PCI layout on the q35 root bus (`pcie.0`), fixed whatever the node's interface count:

    00:01.0          management NIC (user-mode networking), when the node has `mgmt`
    00:02.0          boot disk, when the node boots an `image`; else its day-0 seed
    00:02.1          the day-0 seed (NoCloud `cidata`) of a node that boots an `image`
    00:03.0-00:1e.0  PCI-PCI bridges 0..27; bridge k holds data positions 31k .. 31k+30
                     at its slots 1..31 (slot 0 stays empty, as libvirt does)
    00:1f.x          ICH9 functions that q35 always has

Every data NIC sits behind a bridge, because q35's root bus cannot hot-plug and a bridge can
(ACPI hotplug): a link added to a running node is a `device_add` at the NIC's planned place,
the very place a restart would give it, so the node keeps running.

Linux probes the root bus in slot order and only then the buses behind bridges, in the
bridges' slot order, so the position order is the guest's probe order. An interface whose
name ends in a number takes that number as its position (`swp12` → 12, `eth0` → 0), so a
guest that numbers ports by PCI order numbers them as the file does. Bridges 0..k are all
present when position 31k is used, which keeps each bridge's bus number fixed too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlink.topology import PortNaming

ROOT_BUS = "pcie.0"
MGMT_SLOT = 0x01
DISK_SLOT = 0x02
FIRST_BRIDGE_SLOT = 0x03
BRIDGE_COUNT = 28
SLOTS_PER_BRIDGE = 31
POSITION_CAPACITY = BRIDGE_COUNT * SLOTS_PER_BRIDGE  # 868

_TRAILING_NUMBER = re.compile(r"(\d+)$")

# The MAC address key of a node's management NIC: not a valid interface name, so it can never
# collide with one.
MGMT_KEY = "@mgmt"


@dataclass(frozen=True, slots=True, order=True)
class PciPlace:
    """Where a device sits: a bus id (`pcie.0` or a bridge's id) and a slot on it."""

    bus: str
    slot: int

    @property
    def addr(self) -> str:
        return f"{self.slot:#x}"


def bridge_id(index: int) -> str:
    return f"qlink-br{index}"


def bridge_place(index: int) -> PciPlace:
    return PciPlace(ROOT_BUS, FIRST_BRIDGE_SLOT + index)


def place_of(position: int) -> PciPlace:
    """The PCI place of a data position; a pure function, so positions never move."""
    if not 0 <= position < POSITION_CAPACITY:
        raise ValueError(f"position {position} is outside 0..{POSITION_CAPACITY - 1}")
    bridge, offset = divmod(position, SLOTS_PER_BRIDGE)
    return PciPlace(bridge_id(bridge), offset + 1)


def bridges_needed(positions: Iterable[int]) -> int:
    """How many bridges (always the first ones, contiguously) hold these positions."""
    highest = max(positions, default=-1)
    return 0 if highest < 0 else highest // SLOTS_PER_BRIDGE + 1


def natural_position(interface: str) -> int | None:
    """The position an interface's own name asks for: its trailing number, if it fits."""
    match = _TRAILING_NUMBER.search(interface)
    if match is None:
        return None
    number = int(match.group(1))
    return number if number < POSITION_CAPACITY else None


def kind_position(interface: str, naming: PortNaming | None, mgmt_port: str | None) -> int | None:
    """The position a node's kind gives an interface, or None when it gives none.

    Without port naming, the name's trailing number (`natural_position`). With it, data
    port k (`prefix` + `first` + k * `step`: swp1, Ethernet4, ...) sits at position k, or
    k + 1 when the kind keeps the first NIC for management (`mgmt_port`), whose name then
    takes position 0. Positions are the guest's probe order, so the guest numbers its
    ports as the file names them, with holes where a port is not cabled.
    """
    if mgmt_port is not None and interface == mgmt_port:
        return 0
    if naming is None:
        return natural_position(interface)
    digits = interface.removeprefix(naming.prefix)
    if digits == interface or not digits.isdigit():
        return None
    index, rest = divmod(int(digits) - naming.first, naming.step)
    position = index + (1 if mgmt_port is not None else 0)
    if index < 0 or rest or position >= POSITION_CAPACITY:
        return None
    return position


def assign_positions(
    interfaces: Iterable[str],
    remembered: Mapping[str, int],
    natural: Callable[[str], int | None] = natural_position,
) -> dict[str, int]:
    """Give each interface of one node a position.

    A remembered position is kept; otherwise a name with a natural position (by default its
    trailing number; a kind's port naming, `kind_position`) takes it if it is free (ties go
    to the name that sorts first); every other name takes the highest free position, which
    keeps the low numbers free for port-numbered names added later.
    """
    wanted = sorted(set(interfaces))
    if len(wanted) > POSITION_CAPACITY:
        raise ValueError(f"{len(wanted)} interfaces, but a node holds {POSITION_CAPACITY}")
    assigned: dict[str, int] = {}
    taken: set[int] = set()
    for name in wanted:
        position = remembered.get(name)
        if position is not None and 0 <= position < POSITION_CAPACITY and position not in taken:
            assigned[name] = position
            taken.add(position)
    numbered = sorted(
        (wanted_at, name)
        for name in wanted
        if name not in assigned and (wanted_at := natural(name)) is not None
    )
    for wanted_at, name in numbered:
        if wanted_at not in taken:
            assigned[name] = wanted_at
            taken.add(wanted_at)
    for name in wanted:
        if name not in assigned:
            position = _highest_free(taken)
            assigned[name] = position
            taken.add(position)
    return assigned


def _highest_free(taken: set[int]) -> int:
    """The highest free position among the buses already in use, adding a bridge if full.

    Highest, so that low numbers stay free for port-numbered names added later; within the
    buses in use, so that one oddly named interface does not bring more bridges with it.
    """
    bridges = bridges_needed(taken)
    while True:
        limit = bridges * SLOTS_PER_BRIDGE
        for position in range(limit - 1, -1, -1):
            if position not in taken:
                return position
        bridges += 1


def mac_address(lab: str, node: str, interface: str, avoid: Collection[str] = frozenset()) -> str:
    """A locally administered unicast MAC derived from the interface's full name.

    40 bits of hash behind a fixed 02 first octet: collisions within one lab are
    astronomically unlikely, and the plan still refuses one if it happens. A derived MAC
    that is in `avoid` (the lab's fixed MACs) is derived again with a counter, so a MAC the
    file fixes for one interface is never given to another; still a function of the file.
    """
    salt = 0
    while True:
        suffix = f"\0{salt}" if salt else ""
        key = f"qlink\0{lab}\0{node}\0{interface}{suffix}"
        digest = hashlib.sha256(key.encode()).digest()
        mac = ":".join(f"{byte:02x}" for byte in (0x02, *digest[:5]))
        if mac not in avoid:
            return mac
        salt += 1
