"""Carrier: one owner per lab, one task, fed by node-state changes and cable cuts.

A link end has carrier when its cable is not cut and, if the lab says so
(`carrier_follows_peer`), its peer runs (`true`) or its peer is ready (`ready`: a guest's
own reboot takes its peers' ports down until it is ready again). The keeper sets it with
QMP `set_link` on the netdev (the guest sees the link go down, and no frame passes), always
through the VM's own supervisor, and records what QEMU acknowledged, per QEMU process (PID):
that, not what qlink intends, is what `links` shows. A QEMU that qlinkd started has every
link up; an adopted one (which an earlier qlinkd may have cut) is unknown until set.

The task never dies of an error: a failed pass is logged and tried again, with backoff, so a
bug here can cost a cable its carrier for a while, never the daemon its labs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from qlink.daemon.events import EventBus
from qlink.errors import NotRunning, QlinkError
from qlink.policy import VmStatus
from qlink.runtime.handles import MonitorHandle
from qlink.states import MOVES_CARRIER, SERVES_QMP, VmState
from qlink.topology import Link

if TYPE_CHECKING:
    from qlink.daemon.labs import LabRuntime

log = structlog.get_logger("qlinkd")

RETRY_FIRST = 0.5
RETRY_CAP = 30.0


@dataclass(frozen=True, slots=True)
class Applied:
    """What one QEMU acknowledged for one NIC."""

    pid: int
    up: bool
    reason: str


class CarrierKeeper:
    def __init__(self, lab: LabRuntime, events: EventBus) -> None:
        self._lab = lab
        self._events = events
        self._applied: dict[tuple[str, str], Applied] = {}
        self._launching: set[str] = set()
        self._ready: dict[str, bool] = {}
        self._dirty: set[str] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._retry_delay = RETRY_FIRST
        self._retry: asyncio.TimerHandle | None = None

    # --- what the daemon tells it ---------------------------------------------------------

    def node_changed(self, node: str, status: VmStatus) -> None:
        """After every transition of one of the lab's nodes."""
        if status.state == VmState.STARTING:
            self._launching.add(node)
            return
        if status.state == VmState.RUNNING and node in self._launching and status.pid:
            # A QEMU this qlinkd started: every NIC comes up with carrier.
            for nic in self._lab.plan.nodes[node].nics if node in self._lab.plan.nodes else ():
                self._applied[(node, nic.interface)] = Applied(status.pid, True, "up")
        self._launching.discard(node)
        ready, self._ready[node] = self._ready.get(node), status.ready_at is not None
        readiness_moved = ready != self._ready[node] and self._lab.carrier_depends_on_readiness()
        if status.state in MOVES_CARRIER or readiness_moved:
            self.request(node)

    def request(self, *nodes: str) -> asyncio.Future[None]:
        """A pass over the links of `nodes`, soon; the future is done after it."""
        self._dirty.update(nodes)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    def plugged(self, node: str, interface: str, pid: int) -> None:
        """A NIC hot-plugged into a running QEMU comes up with carrier."""
        self._applied[(node, interface)] = Applied(pid, True, "up")

    def forget(self, node: str, interface: str | None = None) -> None:
        """A NIC (or every NIC of a node) taken away: nothing is known of it any more."""
        for key in [key for key in self._applied if key[0] == node]:
            if interface is None or key[1] == interface:
                del self._applied[key]

    # --- what it reports ----------------------------------------------------------------

    def shown(self, node: str, interface: str) -> str:
        """The carrier QEMU acknowledged for this end: `up`, `down (why)`, `pending` (not
        set yet, or being retried) or `none (STATE)` when the node does not run."""
        supervisor = self._lab.supervisors.get(node)
        if supervisor is None or supervisor.status.state not in SERVES_QMP:
            state = supervisor.status.state.value if supervisor is not None else "removed"
            return f"none ({state})"
        applied = self._applied.get((node, interface))
        if applied is None or applied.pid != supervisor.status.pid:
            return "pending"
        return "up" if applied.up else applied.reason

    # --- the task -----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            nodes, self._dirty = self._dirty, set()
            waiters, self._waiters = self._waiters, []
            try:
                failed = await self._pass(nodes)
            except Exception:  # the keeper's boundary (a bug outside one end): try again
                log.exception("carrier_pass_failed", lab=self._lab.name, nodes=sorted(nodes))
                failed = nodes
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            if failed:
                self._schedule_retry(failed)
            else:
                self._retry_delay = RETRY_FIRST

    def _schedule_retry(self, nodes: set[str]) -> None:
        self._dirty.update(nodes)
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(self._retry_delay, self._wake.set)
        self._retry_delay = min(RETRY_CAP, self._retry_delay * 2)

    async def _pass(self, nodes: set[str]) -> set[str]:
        """Give every end of `nodes`' links the carrier it should have now: their own ends
        (a QEMU that just started has every link up) and their peers' (they follow it)."""
        failed: set[str] = set()
        for link in self._lab.record.lab.links:
            if not any(end.node in nodes for end in link.endpoints):
                continue
            for end in link.endpoints:
                try:
                    done = await self._set(link, end.node, end.interface)
                except Exception:  # one end's bug must not keep the others' carrier back
                    log.exception("carrier_end_failed", lab=self._lab.name, node=end.node,
                                  interface=end.interface)  # fmt: skip
                    self._applied.pop((end.node, end.interface), None)
                    done = False
                if not done:
                    failed.add(end.node)
        return failed

    async def _set(self, link: Link, node: str, interface: str) -> bool:
        supervisor = self._lab.supervisors.get(node)
        if supervisor is None or supervisor.status.state not in SERVES_QMP:
            return True  # not running: it gets its carrier when it starts
        up, reason = self._lab.wanted_carrier(link, node)
        known = self._applied.get((node, interface))
        if known is not None and known.pid == supervisor.status.pid and known.up == up:
            return True  # that QEMU's NIC has it already
        netdev = supervisor.plan.nic(interface).netdev_id

        async def set_link(qmp: MonitorHandle, pid: int) -> int:
            # set_link on the netdev takes the backend down and tells the NIC, so the guest
            # sees carrier loss (virtio-net link status) and no frame passes either way.
            await qmp.execute("set_link", {"name": netdev, "up": up})
            return pid

        try:
            pid: Any = await supervisor.call(set_link)
        except NotRunning:
            return True  # it stopped meanwhile: it gets its carrier when it starts
        except QlinkError as error:
            self._applied.pop((node, interface), None)  # unknown now: retried
            log.warning("carrier_not_set", lab=self._lab.name, node=node, interface=interface,
                        error=str(error))  # fmt: skip
            return False
        self._applied[(node, interface)] = Applied(pid, up, reason)
        log.info("carrier_set", lab=self._lab.name, node=node, interface=interface, up=up,
                 reason=reason)  # fmt: skip
        self._events.publish(
            "carrier", lab=self._lab.name, node=node, interface=interface, up=up, reason=reason,
            pid=pid,
        )  # fmt: skip
        return True
