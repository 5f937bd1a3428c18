"""What each VM's supervisor asks of the daemon (the `supervisor.Hooks` protocol): ports
checked, files made, its process recorded, and its transitions told to the rest."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from qlink.daemon.events import EventBus
from qlink.daemon.labs import Labs
from qlink.daemon.records import LabStore
from qlink.plan.lab import NodePlan
from qlink.plan.paths import Layout
from qlink.policy import VmStatus, is_ready
from qlink.runtime.ports import check_tcp_port_free, check_udp_ports_free
from qlink.runtime.process import ProcessIdentity, create_overlay
from qlink.runtime.seed import write_seed
from qlink.runtime.sshkey import ensure_ssh_credential

log = structlog.get_logger("qlinkd")


def check_node_ports(plan: NodePlan) -> None:
    """Every UDP port of the node's NICs and its SSH forward is free (blocking: it may
    walk the host's sockets to name who holds one)."""
    for nic in plan.nics:
        check_udp_ports_free(nic.local_address, [nic.local_port])
    if plan.mgmt is not None:
        check_tcp_port_free(plan.mgmt.host_address, plan.mgmt.ssh_port)


class DaemonHooks:
    def __init__(self, layout: Layout, store: LabStore, events: EventBus, labs: Labs) -> None:
        self._layout = layout
        self._store = store
        self._events = events
        self._labs = labs
        # One key pair per root, asked for by every node with a management NIC as it starts:
        # unserialised, nodes starting together each made a pair, and the ones launched before
        # the last pair replaced theirs carried a public key whose private half was gone.
        self._ssh_key_lock = asyncio.Lock()

    async def check_ports(self, plan: NodePlan) -> None:
        await asyncio.to_thread(check_node_ports, plan)

    async def prepare_files(self, plan: NodePlan) -> None:
        if plan.node.image is not None and await create_overlay(
            Path(plan.node.image), plan.paths.overlay
        ):
            log.info("overlay_created", node=plan.name, overlay=str(plan.paths.overlay))
        seed = plan.seed
        if seed is not None and await asyncio.to_thread(write_seed, seed, plan.paths.seed):
            log.info("seed_written", node=plan.name, seed=str(plan.paths.seed),
                     digest=seed.digest[:16])  # fmt: skip
        if plan.mgmt is not None:
            async with self._ssh_key_lock:
                if await ensure_ssh_credential(self._layout.ssh_key, plan.mgmt.ssh_credential):
                    log.info("ssh_key_ready", key=str(self._layout.ssh_key))

    def record_process(self, plan: NodePlan, identity: ProcessIdentity | None) -> None:
        self._store.record_process(plan, identity)

    def state_changed(self, plan: NodePlan, status: VmStatus) -> None:
        ready = is_ready(status, plan.node.ready is not None)
        self._events.publish(
            "node_state", lab=plan.lab, node=plan.name, **status.as_dict(), ready=ready
        )
        lab = self._labs.get(plan.lab)
        if lab is not None and lab.carrier is not None and plan.name in lab.supervisors:
            lab.carrier.node_changed(plan.name, status)
