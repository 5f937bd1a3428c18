"""The labs that are up, and finding a node or an interface in them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qlink.daemon.changes import RunningNode
from qlink.daemon.records import LabRecord
from qlink.errors import Conflict, Invalid, NotFound
from qlink.plan.lab import LabPlan
from qlink.states import GIVES_PEERS_CARRIER
from qlink.supervisor import VmSupervisor
from qlink.topology import Link

if TYPE_CHECKING:
    from qlink.daemon.carrier import CarrierKeeper


@dataclass
class LabRuntime:
    """One lab that is up: its record, its plan, a supervisor and a task per node, and the
    owner of its carrier."""

    record: LabRecord
    plan: LabPlan
    supervisors: dict[str, VmSupervisor] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    carrier: CarrierKeeper | None = None
    carrier_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.plan.name

    def wanted_carrier(self, link: Link, node: str) -> tuple[bool, str]:
        """Whether `node`'s end of `link` should have carrier, and why (not)."""
        if link.key in self.record.links_down:
            return False, "down (admin)"
        interface = next(end.interface for end in link.endpoints if end.node == node)
        peer = link.peer_of(node, interface)
        supervisor = self.supervisors.get(peer.node)
        peer_live = supervisor is not None and supervisor.status.state in GIVES_PEERS_CARRIER
        follows = self.record.lab.carrier_follows_peer
        if follows and not peer_live:
            return False, f"down ({peer.node} not running)"
        if follows == "ready" and supervisor is not None and not _ready_or_unwatched(supervisor):
            return False, f"down ({peer.node} not ready)"
        return True, "up"

    def carrier_depends_on_readiness(self) -> bool:
        return self.record.lab.carrier_follows_peer == "ready"

    def running_nodes(self) -> dict[str, RunningNode]:
        return {
            name: RunningNode(supervisor.plan, supervisor.argv, supervisor.status.state)
            for name, supervisor in self.supervisors.items()
        }

    def tasks_to_end(self) -> list[asyncio.Task[None]]:
        tasks = list(self.tasks.values())
        return [*tasks, self.carrier_task] if self.carrier_task is not None else tasks


class Labs:
    def __init__(self) -> None:
        self._labs: dict[str, LabRuntime] = {}

    def __iter__(self) -> Iterator[LabRuntime]:
        """In name order, every time."""
        return iter(sorted(self._labs.values(), key=lambda lab: lab.name))

    def __len__(self) -> int:
        return len(self._labs)

    def get(self, name: str) -> LabRuntime | None:
        return self._labs.get(name)

    def add(self, lab: LabRuntime) -> None:
        self._labs[lab.name] = lab

    def remove(self, name: str) -> None:
        self._labs.pop(name, None)

    def find_node(self, reference: str) -> tuple[LabRuntime, VmSupervisor]:
        """`node` or `lab/node`; a bare name must be unambiguous."""
        lab_name, _, node_name = reference.rpartition("/")
        matches = [
            (lab, lab.supervisors[node_name])
            for lab in self
            if node_name in lab.supervisors and lab_name in ("", lab.name)
        ]
        if not matches:
            raise NotFound(f"no node {reference!r} in any lab that is up")
        if len(matches) > 1:
            labs = ", ".join(lab.name for lab, _ in matches)
            raise Conflict(f"node {node_name!r} is in several labs ({labs}): say LAB/{node_name}")
        return matches[0]

    def find_endpoint(self, reference: str) -> tuple[LabRuntime, VmSupervisor, str]:
        """`NODE:IF` or `LAB/NODE:IF`: the node's lab, its supervisor, the interface."""
        node_ref, sep, interface = reference.rpartition(":")
        if not sep or not node_ref:
            raise Invalid(f"say NODE:INTERFACE, not {reference!r}")
        lab, supervisor = self.find_node(node_ref)
        if lab.record.lab.link_of(supervisor.name, interface) is None:
            raise NotFound(f"{supervisor.name} has no interface {interface!r}")
        return lab, supervisor, interface


def _ready_or_unwatched(supervisor: VmSupervisor) -> bool:
    """A node without a `ready:` source counts as ready once it runs: nothing else would
    ever give its peers carrier."""
    return supervisor.plan.node.ready is None or supervisor.status.ready_at is not None
