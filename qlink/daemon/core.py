"""The daemon's core: it wires the parts together (labs, supervisors, carrier keepers, the
event stream, records) and carries out the operations the control API exposes. Decisions
live elsewhere: what `up` changes is `changes.diff_lab`, carrier is `carrier.py`, a VM's
life is its supervisor's, and every word with a VM's QMP goes through that supervisor.

The daemon is disposable; the VMs are not. Stopping, killing or upgrading qlinkd leaves every
QEMU running, and the next qlinkd re-adopts them from what is recorded under the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import structlog

from qlink.daemon.carrier import CarrierKeeper
from qlink.daemon.changes import diff_lab
from qlink.daemon.events import Event, EventBus, Subscription
from qlink.daemon.hooks import DaemonHooks, check_node_ports
from qlink.daemon.impairs import ImpairKeeper, kept_live
from qlink.daemon.labs import LabRuntime, Labs
from qlink.daemon.records import LabRecord, LabStore
from qlink.daemon.stopscan import scan_stopped
from qlink.daemon.views import link_row, link_rows, status_rows
from qlink.daemon.waiting import boot_order, start_after, wait_ready
from qlink.errors import Conflict, Invalid, NotFound, NotRunning, PortInUseError, QlinkError
from qlink.limits import HostResources
from qlink.plan.argv import HostFacts, build_argv, nic_device_options, nic_netdev_arguments
from qlink.plan.lab import LabPlan, NicPlan, NodePlan, plan_lab
from qlink.plan.paths import Layout
from qlink.plan.replug import NicReplug
from qlink.policy import SupervisorSettings, VmStatus
from qlink.runtime.handles import MonitorHandle, Runtime, VmRuntime
from qlink.runtime.impair import TrafficControl
from qlink.runtime.links import LinkSocket, open_link_socket
from qlink.runtime.ports import check_udp_ports_free
from qlink.runtime.ports import ports_in_use as host_ports_in_use
from qlink.runtime.process import CreationWatcher, ProcessIdentity
from qlink.state import load_allocations, save_allocations
from qlink.supervisor import VmSupervisor
from qlink.topology import Lab, parse_topology_text

log = structlog.get_logger("qlinkd")

NODE_VERBS = ("start", "stop", "restart")
CARRIER_SETTLE_TIMEOUT = 5.0


class Daemon:
    """Everything qlinkd does, callable from the control API and from tests. `runtime`
    is the VM runtime supervisors drive; tests pass a fake one."""

    def __init__(
        self,
        layout: Layout,
        host: HostFacts,
        settings: SupervisorSettings | None = None,
        runtime: Runtime | None = None,
        resources: HostResources | None = None,
        *,
        traffic: TrafficControl | None = None,
    ) -> None:
        self.layout = layout
        self.resources = resources
        """What a lab's nodes are checked against at `up`; None checks no host limits."""
        self.host = host
        self.settings = settings or SupervisorSettings()
        self.labs = Labs()
        self.events = EventBus()
        self.store = LabStore(layout)
        self.hooks = DaemonHooks(layout, self.store, self.events, self.labs)
        self.impairs = ImpairKeeper(layout, self.labs, self.store, self.events, traffic)
        self._runtime = runtime
        self._group: asyncio.TaskGroup | None = None
        # One `up`/`down` at a time: each plans against the allocations the last one left.
        self._lab_lock = asyncio.Lock()

    # --- life cycle ---------------------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Adopt what runs, then run supervisors until cancelled (the VMs stay up)."""
        watcher = CreationWatcher() if self._runtime is None else None
        if watcher is not None:
            self._runtime = VmRuntime(watcher, vm_nice=self.settings.vm_nice)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                dispatcher = group.create_task(watcher.run()) if watcher is not None else None
                scanner = group.create_task(scan_stopped(self.labs, self.settings.liveness))
                try:
                    self._restore_labs()
                    # The kernel kept the impairment; this qlinkd owns it again (and drops
                    # whatever of this root's no lab wants, after a kill -9 mid-change).
                    await self.impairs.settle("qlinkd started")
                    # Serve only once every VM left by a previous qlinkd is adopted (or known
                    # gone): a `status` must never show a running VM as stopped.
                    for lab in self.labs:
                        for supervisor in lab.supervisors.values():
                            await supervisor.settled.wait()
                    if ready is not None:
                        ready()
                    await asyncio.Future()  # until cancelled
                finally:
                    for lab in self.labs:
                        for task in lab.tasks_to_end():
                            task.cancel()
                    scanner.cancel()
                    if dispatcher is not None:
                        dispatcher.cancel()
                    self._group = None
        finally:
            if watcher is not None:
                watcher.close()

    def _restore_labs(self) -> None:
        for record in self.store.saved():
            try:
                plan, _ = plan_lab(record.lab, self.layout, load_allocations(self.layout))
            except QlinkError as error:
                log.error("lab_restore_failed", lab=record.lab.name, error=str(error))
                continue
            lab = self._add_lab(record, plan)
            for name, node_plan in plan.nodes.items():
                identity = self.store.recorded_process(node_plan)
                argv = build_argv(node_plan, self.host)
                self._spawn_supervisor(
                    lab, node_plan, argv, identity, want_running=name not in record.stopped
                )
            log.info("lab_restored", lab=plan.name, nodes=len(plan.nodes))

    def _add_lab(self, record: LabRecord, plan: LabPlan) -> LabRuntime:
        assert self._group is not None, "the daemon is not serving"
        lab = LabRuntime(record, plan)
        lab.carrier = CarrierKeeper(lab, self.events)
        lab.carrier_task = self._group.create_task(lab.carrier.run(), name=f"carrier:{plan.name}")
        self.labs.add(lab)
        self.events.publish("lab", lab=plan.name, action="up")
        return lab

    def _spawn_supervisor(
        self,
        lab: LabRuntime,
        plan: NodePlan,
        argv: list[str],
        identity: ProcessIdentity | None,
        want_running: bool,
    ) -> VmSupervisor:
        assert self._group is not None, "the daemon is not serving"
        supervisor = VmSupervisor(
            plan, argv, self.hooks, settings=self.settings, runtime=self._runtime
        )
        lab.supervisors[plan.name] = supervisor
        # The supervisor's own boundary keeps a bug in it from reaching this group.
        lab.tasks[plan.name] = self._group.create_task(
            supervisor.run(identity, want_running), name=f"vm:{plan.lab}/{plan.name}"
        )
        return supervisor

    # --- labs -------------------------------------------------------------------------

    async def parse(self, text: str, source: str) -> Lab:
        """Validate a topology off the event loop: no file, however large or hostile, may
        hold up supervision while it is parsed."""
        return await asyncio.to_thread(
            parse_topology_text, text, source, lambda path: Path(path).is_file(), self.resources
        )

    async def up(self, lab: Lab, dry_run: bool = False) -> AsyncIterator[Event]:
        """Bring a lab to what its file says; yields progress until every node runs or failed.

        All checks (plan, ports) come before anything starts, so a refused `up` changes
        nothing. On a lab that is up, only nodes whose command line changed are restarted
        (or get NICs plugged), and nodes gone from the file are stopped.
        """
        marks = {"up": time.monotonic()}
        async with self._lab_lock:
            # Only management SSH allocates TCP ports, and the TCP tables are slow to read.
            needs_tcp = any(node.mgmt for node in lab.nodes.values())
            busy = await asyncio.to_thread(host_ports_in_use, needs_tcp)
            marks["ports_scanned"] = time.monotonic()
            plan, allocations = plan_lab(
                lab, self.layout, load_allocations(self.layout), busy_udp=busy.udp,
                busy_tcp=busy.tcp,
            )  # fmt: skip
            current = self.labs.get(lab.name)
            argvs = {name: build_argv(node, self.host) for name, node in plan.nodes.items()}
            change = diff_lab(
                current.running_nodes() if current is not None else None,
                set(current.record.stopped) if current is not None else set(),
                plan, argvs, self.host,
            )  # fmt: skip
            summary: dict[str, Any] = {"event": "plan", "lab": lab.name, **change.as_dict()}
            waits = lab.boot_waits()
            order = boot_order(waits, sorted(change.start))
            if len(order) > 1:
                summary["boot_order"] = order
            if dry_run:
                yield summary
                yield {"event": "done", "lab": lab.name, "failed": {}, "dry_run": True}
                return
            marks["planned"] = time.monotonic()
            await asyncio.to_thread(
                self._preflight, [plan.nodes[name] for name in change.start], change.replug
            )
            marks["preflight"] = time.monotonic()
            adopted: list[LabRuntime] = []

            def adopt() -> None:
                save_allocations(self.layout, allocations)
                adopted.append(self._adopt_plan(current, lab, plan, argvs))

            # The lab's impairment is in place before any VM starts; refused, nothing starts.
            impair = kept_live(current.record, lab) if current is not None else {}
            await self.impairs.before_up(plan, LabRecord(lab=lab, impair=impair), adopt)
            runtime = adopted[0]
            yield summary
            with self.events.subscribe() as updates:
                for name in change.remove:
                    await self._remove_node(runtime, name)
                waiting: dict[str, asyncio.Future[VmStatus]] = {}
                for name, replug in change.replug.items():
                    if not await self._replug(runtime, name, replug):
                        waiting[name] = runtime.supervisors[name].submit("restart")
                for name in change.restart:
                    waiting[name] = runtime.supervisors[name].submit("restart")
                self._start_in_order(runtime, plan, argvs, order, waits=waits, waiting=waiting)
                marks["submitted"] = time.monotonic()
                async for update in _progress(lab.name, waiting, updates):
                    if update["event"] == "done":
                        marks["all_answered"] = time.monotonic()
                        await self._carrier_settled(runtime)
                        marks["carrier_settled"] = time.monotonic()
                        # Monotonic seconds of each step (bench/timeline.py reads them).
                        log.info("up_timeline", lab=lab.name, nodes=len(waiting), marks=marks)
                    yield update

    def _start_in_order(
        self,
        lab: LabRuntime,
        plan: LabPlan,
        argvs: dict[str, list[str]],
        order: list[list[str]],
        *,
        waits: dict[str, frozenset[str]],
        waiting: dict[str, asyncio.Future[VmStatus]],
    ) -> None:
        """Start the nodes of `order` (boot waves), each once those it waits for are ready;
        `waiting` gets each node's start."""
        for name in (node for wave in order for node in wave):
            if name not in lab.supervisors:
                self._spawn_supervisor(lab, plan.nodes[name], argvs[name], None, want_running=False)
        for name in (node for wave in order for node in wave):  # a node after its own
            waiting[name] = self._start_after_others(lab, name, waits, waiting)

    def _start_after_others(
        self,
        lab: LabRuntime,
        name: str,
        waits: dict[str, frozenset[str]],
        starting: dict[str, asyncio.Future[VmStatus]],
    ) -> asyncio.Future[VmStatus]:
        """The node's start, after the nodes it waits for (a task of its own: a client that
        goes away does not stop the lab coming up in order)."""
        others = {
            other: (lab.supervisors[other], starting.get(other))
            for other in waits.get(name, frozenset())
            if other in lab.supervisors
        }
        if not others:
            return lab.supervisors[name].submit("start")

        def announce(names: list[str]) -> None:
            self.events.publish("boot_wait", lab=lab.name, node=name, waits_for=names)

        task = asyncio.ensure_future(start_after(lab.supervisors[name], others, announce))
        _quietly(task)
        return task

    async def _carrier_settled(self, lab: LabRuntime) -> None:
        """Let the lab's carrier catch up before `up` answers, so that `links` then shows
        what QEMU has; bounded, since a QEMU that does not answer must not hold up `up`."""
        assert lab.carrier is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CARRIER_SETTLE_TIMEOUT):
                await lab.carrier.request(*lab.supervisors)

    def _adopt_plan(
        self, current: LabRuntime | None, lab: Lab, plan: LabPlan, argvs: dict[str, list[str]]
    ) -> LabRuntime:
        """Make the new lab and plan the ones qlinkd holds, and tell each running node's
        supervisor its next argv (it takes effect at its next launch)."""
        if current is None:
            runtime = self._add_lab(LabRecord(lab=lab), plan)
        else:
            runtime = current
            self.events.publish("lab", lab=lab.name, action="changed")
        keys = {link.key for link in lab.links}
        runtime.record = LabRecord(
            lab=lab,
            stopped=[n for n in runtime.record.stopped if n in plan.nodes],
            links_down=[k for k in runtime.record.links_down if k in keys],
            impair=kept_live(runtime.record, lab),
        )
        runtime.plan = plan
        self.store.save(runtime.record)
        for name, supervisor in runtime.supervisors.items():
            if name in plan.nodes:
                # Answered once the VM's task takes it, before any later command of `up`.
                _quietly(supervisor.configure(plan.nodes[name], argvs[name]))
        return runtime

    def _preflight(self, nodes: list[NodePlan], replugs: dict[str, NicReplug]) -> None:
        """Every port of every node about to start, and of every NIC about to be plugged into
        a running node, is free, or nothing changes: a plug that failed on a taken port would
        leave that node to a restart that fails the same way."""
        for plan in nodes:
            try:
                check_node_ports(plan)
            except QlinkError as error:
                raise Conflict(
                    f"cannot start {plan.lab}/{plan.name}: {error}; nothing was started"
                ) from error
        for name, replug in replugs.items():
            # A recabled NIC keeps its port, which the running QEMU holds until the unplug.
            held = {nic.local_port for nic in replug.unplug}
            for nic in replug.plug:
                if nic.local_port in held:
                    continue
                try:
                    check_udp_ports_free(nic.local_address, [nic.local_port])
                except PortInUseError as error:
                    raise Conflict(
                        f"cannot plug {name}:{nic.interface}: {error}; nothing was changed"
                    ) from error

    async def _replug(self, lab: LabRuntime, name: str, replug: NicReplug) -> bool:
        """Take NICs out of a running node and put others in, through its supervisor;
        False if it needs a restart instead.

        The supervisor already holds the new plan and argv, so should the VM restart or crash
        meanwhile, it comes back with the new NICs anyway.
        """
        supervisor = lab.supervisors[name]
        plan = lab.plan.nodes[name]
        unplug_timeout = self.settings.unplug_timeout

        async def hotplug(qmp: MonitorHandle, pid: int) -> int:
            for nic in replug.unplug:
                await qmp.unplug(nic.device_id, timeout=unplug_timeout)
                await qmp.execute("netdev_del", {"id": nic.netdev_id})
            for nic in replug.plug:
                await _plug_nic(qmp, plan, nic)
            return pid

        assert lab.carrier is not None
        for nic in replug.unplug:
            lab.carrier.forget(name, nic.interface)
        try:
            pid = await supervisor.call(hotplug)
        except NotRunning:
            return True  # not running after all: it starts with the new command line
        except QlinkError as error:
            log.warning("replug_failed", lab=lab.name, node=name, error=str(error))
            return False
        for nic in replug.plug:
            lab.carrier.plugged(name, nic.interface, pid)
        log.info("nics_replugged", lab=lab.name, node=name, change=replug.describe())
        return True  # the plugged NICs' carrier is set by the pass that ends `up`

    async def _remove_node(self, lab: LabRuntime, name: str) -> None:
        supervisor = lab.supervisors.pop(name)
        with contextlib.suppress(QlinkError):
            await supervisor.submit("stop")
        lab.tasks.pop(name).cancel()
        if lab.carrier is not None:
            lab.carrier.forget(name)

    async def down(self, lab_name: str, graceful: bool = True) -> AsyncIterator[Event]:
        """Stop every node at once (each its own ladder, in parallel) and forget the lab;
        `graceful=False` skips the guests' ACPI power-down, straight to QMP quit."""
        async with self._lab_lock:
            lab = self.labs.get(lab_name)
            if lab is None:
                raise NotFound(f"no lab named {lab_name!r} is up")
            with self.events.subscribe() as updates:
                waiting = {
                    name: supervisor.submit("stop", graceful)
                    for name, supervisor in lab.supervisors.items()
                }
                async for update in _progress(lab_name, waiting, updates):
                    yield update
            for task in lab.tasks_to_end():
                task.cancel()
            self.labs.remove(lab_name)
            self.store.forget(lab_name)
            await self.impairs.settle(f"lab {lab_name} down")  # its directions go with it
            self.events.publish("lab", lab=lab_name, action="down")
            log.info("lab_down", lab=lab_name)

    # --- nodes and links ----------------------------------------------------------------

    async def node_command(self, reference: str, verb: str, graceful: bool = True) -> VmStatus:
        if verb not in NODE_VERBS:
            raise Invalid(f"unknown verb {verb!r}: one of {', '.join(NODE_VERBS)}")
        lab, supervisor = self.labs.find_node(reference)
        stopped = set(lab.record.stopped)
        stopped.discard(supervisor.name) if verb != "stop" else stopped.add(supervisor.name)
        if stopped != set(lab.record.stopped):
            lab.record = lab.record.model_copy(update={"stopped": sorted(stopped)})
            self.store.save(lab.record)
        return await supervisor.submit(verb, graceful)  # type: ignore[arg-type]

    async def set_link(self, reference: str, up: bool) -> dict[str, Any]:
        """`link down|up NODE:IF` (or `LAB/NODE:IF`): a cut cable, both ends, remembered;
        answered once QEMU has acknowledged the carrier of both ends."""
        lab, supervisor, interface = self.labs.find_endpoint(reference)
        link = lab.record.lab.link_of(supervisor.name, interface)
        assert link is not None
        down = set(lab.record.links_down)
        down.discard(link.key) if up else down.add(link.key)
        lab.record = lab.record.model_copy(update={"links_down": sorted(down)})
        self.store.save(lab.record)
        log.info("link_admin", lab=lab.name, link=link.key, up=up)
        self.events.publish("link_admin", lab=lab.name, link=link.key, admin="up" if up else "down")
        assert lab.carrier is not None
        await lab.carrier.request(*(end.node for end in link.endpoints))
        return link_row(lab, link)

    async def set_impair(
        self, reference: str, direction: str, settings: dict[str, Any] | None
    ) -> dict[str, Any]:
        """`link set NODE:IF` (settings None: `--clear`): see `daemon/impairs.py`."""
        lab, link = await self.impairs.set_live(reference, direction, settings)
        return link_row(lab, link)

    async def qmp(self, reference: str, command: str, arguments: dict[str, Any]) -> Any:
        """A QMP command through the VM's own session: QEMU serves one QMP client."""
        _, supervisor = self.labs.find_node(reference)

        async def passthrough(qmp: MonitorHandle, pid: int) -> Any:
            return await qmp.execute(command, arguments or None, timeout=30)

        return await supervisor.call(passthrough)

    async def wait_ready(self, references: list[str], timeout: float) -> dict[str, str]:
        """See `daemon/waiting.py`; here for the API and the tests."""
        return await wait_ready(self.labs, references, timeout)

    # --- read models --------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return status_rows(self.labs, self.host)

    def links(self) -> list[dict[str, Any]]:
        rows = link_rows(self.labs)
        if self.impairs.error is not None:  # the kernel may not have what `impair` says
            for row in rows:
                if row["impair"] is not None:
                    row["impair_error"] = self.impairs.error
        return rows

    def subscribe(self) -> contextlib.AbstractContextManager[Subscription]:
        return self.events.subscribe()


async def _plug_nic(qmp: MonitorHandle, plan: NodePlan, nic: NicPlan) -> None:
    """Plug one NIC into a running VM, the one its command line would have made: its socket
    (bound and connected, as a launch opens it) passed over QMP under the netdev's id, then
    the backend that takes it and the device."""
    with open_link_socket(LinkSocket.of(nic)) as sock:
        await qmp.pass_fd(sock.fileno(), nic.netdev_id)
    # QEMU holds its own copy now; ours is closed. Should netdev_add fail, the copy stays with
    # QEMU's monitor under that name until a restart, which is what a failed replug gets.
    await qmp.execute("netdev_add", nic_netdev_arguments(nic, nic.netdev_id))
    await qmp.execute("device_add", nic_device_options(plan, nic))


def _quietly(future: asyncio.Future[Any]) -> None:
    """A command whose answer nobody needs (a later one is awaited instead): its error, if
    any, is retrieved so that asyncio does not report it as lost."""
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


def _failure(answer: asyncio.Future[VmStatus]) -> str | None:
    if answer.cancelled():
        return "cancelled"  # the lab went down meanwhile
    error = answer.exception()
    return None if error is None else str(error)


async def _progress(
    lab: str, waiting: dict[str, asyncio.Future[VmStatus]], updates: Subscription
) -> AsyncIterator[Event]:
    """The lab's events until every waited-for command is answered, then `done`.

    Each wake waits on the update and every pending node again: one queue of answers fed by
    done-callbacks costs the same per event whatever the lab's size, but measured slower
    (qlinkd's `up` of 20 paused VMs, 8-11 runs each way, alternating, twice: 507/514 ms this
    way, 528/527 ms that way; 200 VMs 5.97 s against 6.18 s).
    """
    pending = set(waiting)
    failed: dict[str, str] = {}
    while pending:
        getter = asyncio.ensure_future(updates.get())
        watched: set[asyncio.Future[Any]] = {getter, *(waiting[name] for name in pending)}
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled() and getter.result().get("lab") == lab:
            yield getter.result()
        for name in list(pending):
            if waiting[name].done():
                pending.discard(name)
                if (failure := _failure(waiting[name])) is not None:
                    failed[name] = failure
    while (update := updates.get_nowait()) is not None:
        if update.get("lab") == lab:
            yield update
    yield {"event": "done", "lab": lab, "failed": failed}
