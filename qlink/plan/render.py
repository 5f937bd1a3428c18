"""A plan as plain data: what `qlinkctl plan -o json` prints and the golden files hold."""

from __future__ import annotations

from typing import Any

from qlink.plan.argv import HostFacts, build_argv
from qlink.plan.lab import LabPlan, NodePlan


def node_document(plan: NodePlan, host: HostFacts) -> dict[str, Any]:
    node = plan.node
    paths = plan.paths
    return {
        "name": plan.name,
        "accel": host.accel_for(node.accel),
        "memory_mib": node.memory,
        "cpus": node.cpus,
        "restart": node.restart,
        # The argv's `-S` is qlinkd's: it runs the CPUs (QMP `cont`) once QEMU has started.
        "held": plan.held,
        "nics": [
            {
                "interface": nic.interface,
                "mac": nic.mac,
                "position": nic.position,
                "pci": {"bus": nic.place.bus, "addr": nic.place.addr},
                # The socket QEMU expects at descriptor `fd`: bound to `local`, connected to
                # `remote` (what anyone launching this argv must hand over).
                "fd": nic.fd,
                "local": f"{nic.local_address}:{nic.local_port}",
                "remote": f"{nic.remote_address}:{nic.remote_port}",
                "peer": str(nic.peer),
            }
            for nic in plan.nics
        ],
        "mgmt": (
            None
            if plan.mgmt is None
            else {
                "mac": plan.mgmt.mac,
                "ssh": f"{plan.mgmt.host_address}:{plan.mgmt.ssh_port}",
                "ssh_credential": str(plan.mgmt.ssh_credential),
            }
        ),
        "paths": {
            "qmp_socket": str(paths.qmp_socket),
            "console_socket": str(paths.console_socket),
            "console_log": str(paths.console_log),
            "qemu_log": str(paths.qemu_log),
            "pidfile": str(paths.pidfile),
            **({"overlay": str(paths.overlay), "image": node.image} if node.image else {}),
            **({"seed": str(paths.seed)} if plan.seed is not None else {}),
        },
        **({"seed": {"digest": plan.seed.digest, **plan.seed.files()}} if plan.seed else {}),
        "argv": build_argv(plan, host),
    }


def lab_document(plan: LabPlan, host: HostFacts) -> dict[str, Any]:
    return {
        "lab": plan.name,
        "source": plan.source,
        "nodes": {name: node_document(node, host) for name, node in sorted(plan.nodes.items())},
        "links": [
            {
                "a": str(link.a),
                "b": str(link.b),
                "a_port": link.a_port,
                "b_port": link.b_port,
            }
            for link in plan.links
        ],
    }
