"""What `up` has to do to a lab, and why: a pure function of the lab as it runs and the lab
the file asks for. The daemon only carries the change out; `up --dry-run` prints it."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from qlink.plan.argv import HostFacts
from qlink.plan.lab import LabPlan, NicPlan, NodePlan
from qlink.plan.options import option_groups
from qlink.plan.replug import NicReplug, nic_replug
from qlink.states import IDLE, VmState


@dataclass(frozen=True, slots=True)
class RunningNode:
    """A node as the daemon has it: the plan and argv its supervisor holds, and its state."""

    plan: NodePlan
    argv: list[str]
    state: VmState


@dataclass
class LabChange:
    """Node name → why, for each thing `up` will do."""

    start: dict[str, str] = field(default_factory=dict)
    restart: dict[str, str] = field(default_factory=dict)
    remove: dict[str, str] = field(default_factory=dict)
    replug: dict[str, NicReplug] = field(default_factory=dict)
    """Running nodes that only gain or lose links: NIC hotplug, no restart."""

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {
            "start": dict(sorted(self.start.items())),
            "restart": dict(sorted(self.restart.items())),
            "remove": dict(sorted(self.remove.items())),
            "replug": {name: self.replug[name].describe() for name in sorted(self.replug)},
        }


def _seed_digest(plan: NodePlan) -> str | None:
    return plan.seed.digest if plan.seed is not None else None


def argv_difference(old: list[str], new: list[str]) -> str:
    """The options that differ, as `- -m 256M; + -m 512M`."""
    before = [" ".join(group) for group in option_groups(old)]
    after = [" ".join(group) for group in option_groups(new)]
    removed = [item for item in before if item not in after]
    added = [item for item in after if item not in before]
    parts = [f"- {item}" for item in removed] + [f"+ {item}" for item in added]
    return "; ".join(parts) if parts else "option order changed"


def _ends(nic: NicPlan) -> str:
    return (
        f"{nic.local_address}:{nic.local_port} to {nic.remote_address}:{nic.remote_port} "
        f"({nic.peer})"
    )


def cable_difference(old: NodePlan, new: NodePlan) -> str:
    """The NICs whose cable moved though the command line did not, as
    `swp2 127.0.0.1:20002 to 127.0.0.1:20003 (leaf2:swp51) -> ...`.

    The argv names a NIC's socket by descriptor number only (`NicPlan.fd`), so a NIC recabled
    to another peer, or given another port, has the same argv and a different socket."""
    new_nics = {nic.interface: nic for nic in new.nics}
    moved = [
        f"{nic.interface} {_ends(nic)} -> {_ends(new_nics[nic.interface])}"
        for nic in old.nics
        if nic.interface in new_nics and _ends(nic) != _ends(new_nics[nic.interface])
    ]
    return "; ".join(moved)


def diff_lab(
    current: Mapping[str, RunningNode] | None,
    operator_stopped: Set[str],
    plan: LabPlan,
    argvs: Mapping[str, list[str]],
    host: HostFacts,
) -> LabChange:
    """What bringing the lab `current` (None: not up) to `plan` takes, node by node."""
    change = LabChange()
    if current is None:
        change.start = {name: "new lab" for name in plan.nodes}
        return change
    change.remove = {name: "not in the file any more" for name in set(current) - set(plan.nodes)}
    for name, wanted in plan.nodes.items():
        node = current.get(name)
        if node is None:
            change.start[name] = "new node"
        else:
            _diff_node(
                change, name, node, wanted, argvs[name],
                operator_stopped=name in operator_stopped, host=host,
            )  # fmt: skip
    return change


def _diff_node(
    change: LabChange,
    name: str,
    node: RunningNode,
    wanted: NodePlan,
    argv: list[str],
    *,
    operator_stopped: bool,
    host: HostFacts,
) -> None:
    idle = node.state in IDLE
    if node.argv == argv and _seed_digest(node.plan) != _seed_digest(wanted):
        # The same command line, other day-0 documents: the seed is rewritten at the next
        # launch, and cloud-init runs day 0 again on its new instance-id.
        if not idle:
            change.restart[name] = "day-0 config changed (cloud_init, network_config or vars)"
        return
    why = _why_changed(node, wanted, argv)
    if why is None:
        if idle and not operator_stopped:
            change.start[name] = f"was {node.state.value}"
        return
    replug = None if idle else nic_replug(node.plan, node.argv, wanted, host)
    if replug is not None:
        change.replug[name] = replug
    elif not idle:
        change.restart[name] = why
    elif not operator_stopped:
        change.start[name] = why


def _why_changed(node: RunningNode, wanted: NodePlan, argv: list[str]) -> str | None:
    """Why the node as it runs is not the node wanted; None when it is."""
    if node.argv != argv:
        return "command line changed: " + argv_difference(node.argv, argv)
    if moved := cable_difference(node.plan, wanted):
        return "cables changed: " + moved
    return None
