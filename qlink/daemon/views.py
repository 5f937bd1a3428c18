"""Read models: the rows `status` and `links` show, built from what the daemon holds."""

from __future__ import annotations

from typing import Any

from qlink.daemon.impairs import effective
from qlink.daemon.labs import LabRuntime, Labs
from qlink.plan.argv import HostFacts
from qlink.policy import is_ready as policy_is_ready
from qlink.states import SERVES_QMP
from qlink.supervisor import VmSupervisor
from qlink.topology import Link


def status_rows(labs: Labs, host: HostFacts) -> list[dict[str, Any]]:
    rows = []
    for lab in labs:
        for name in lab.plan.nodes:  # the file's order, every time
            supervisor = lab.supervisors.get(name)
            if supervisor is None:
                continue
            plan = supervisor.plan
            mgmt = plan.mgmt
            rows.append(
                {
                    "lab": lab.name,
                    "node": name,
                    **supervisor.status.as_dict(),
                    "ready": is_ready(supervisor),
                    "accel": host.accel_for(plan.node.accel),
                    "ports": {nic.interface: nic.local_port for nic in plan.nics},
                    "ssh": f"{mgmt.host_address}:{mgmt.ssh_port}" if mgmt is not None else None,
                    "kind": plan.node.kind,
                    "stage": plan.node.stage,
                    "qmp": str(plan.paths.qmp_socket),
                    "console": str(plan.paths.console_socket),
                }
            )
    return rows


def link_rows(labs: Labs) -> list[dict[str, Any]]:
    return [link_row(lab, link) for lab in labs for link in lab.record.lab.links]


def link_row(lab: LabRuntime, link: Link) -> dict[str, Any]:
    """Both ends of a cable; `carrier` is what QEMU acknowledged, `wanted` what qlink asks."""
    ends = []
    for end in link.endpoints:
        supervisor = lab.supervisors.get(end.node)
        nic = lab.plan.nodes[end.node].nic(end.interface)
        _, wanted = lab.wanted_carrier(link, end.node)
        shown = lab.carrier.shown(end.node, end.interface) if lab.carrier is not None else wanted
        ends.append(
            {
                "endpoint": str(end),
                "port": nic.local_port,
                "mac": nic.mac,
                "pci": f"{nic.place.bus}/{nic.place.addr}",
                "node_state": supervisor.status.state.value if supervisor else None,
                "carrier": shown,
                "wanted": wanted,
            }
        )
    admin = "down" if link.key in lab.record.links_down else "up"
    impairment = effective(lab.record, link)
    return {
        "lab": lab.name, "link": link.key, "admin": admin, "a": ends[0], "b": ends[1],
        # Per direction (a_to_b: frames `a` sends), as set; None: not impaired.
        "impair": impairment.document() if impairment is not None else None,
    }  # fmt: skip


def is_ready(supervisor: VmSupervisor) -> bool:
    return policy_is_ready(supervisor.status, supervisor.plan.node.ready is not None)


def not_ready_because(supervisor: VmSupervisor) -> str:
    status, ready = supervisor.status, supervisor.plan.node.ready
    if status.state in SERVES_QMP and ready is not None:
        return f"running, but still waiting for {ready.source}"
    cause = f": {status.last_error.splitlines()[0]}" if status.last_error else ""
    return f"{status.state.value}{cause}"
