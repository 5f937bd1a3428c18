"""The daemon's core: one task group holding a supervisor task per VM, and the operations
the control API exposes (up, down, start/stop/restart, status, links).

The daemon is disposable; the VMs are not. Stopping, killing or upgrading qlinkd leaves every
QEMU running, and the next qlinkd re-adopts them from what is recorded under the root.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from qlink.errors import ControlError, HostError, PortInUseError, QlinkError, VmError
from qlink.plan.argv import HostFacts, build_argv, nic_device_options, nic_netdev_options
from qlink.plan.lab import LabPlan, NodePlan, plan_lab
from qlink.plan.options import option_groups
from qlink.plan.paths import Layout
from qlink.plan.replug import NicReplug, nic_replug
from qlink.runtime.process import (
    CreationWatcher,
    ProcessIdentity,
    check_tcp_port_free,
    check_udp_ports_free,
    create_overlay,
    ports_in_use,
)
from qlink.runtime.sshkey import ensure_ssh_credential
from qlink.state import load_allocations, save_allocations, write_json
from qlink.supervisor import (
    Hooks,
    SupervisorSettings,
    VmRuntime,
    VmState,
    VmStatus,
    VmSupervisor,
)
from qlink.topology import Lab, Link, parse_topology_text

log = structlog.get_logger("qlinkd")


class LabRecord(BaseModel):
    """What is kept of a lab under the root: the validated lab and what should run."""

    model_config = ConfigDict(extra="forbid")

    lab: Lab
    stopped: list[str] = []
    """Nodes an operator stopped: they stay stopped across daemon restarts."""
    links_down: list[str] = []
    """Links an operator cut (`qlinkctl link down`), by `Link.key`; kept across restarts."""


class ProcessRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pid: int
    start_time: float
    argv: list[str]


@dataclass
class LabRuntime:
    record: LabRecord
    plan: LabPlan
    supervisors: dict[str, VmSupervisor] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # Carrier changes are computed and applied one at a time per lab, so that the last
    # application always reflects the latest node states.
    carrier_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The carrier each NIC has, by (node, interface): the PID of the QEMU that has it, and
    # up or not. A QEMU starts with every link up, so a pass sends set_link only where the
    # carrier must change: in a lab coming up, a link whose two ends run costs no command.
    # Keyed by PID, so what a replaced QEMU was told never stands for its successor; a QEMU
    # adopted from an earlier qlinkd (which may have cut links) is unknown: every end is set.
    carriers: dict[tuple[str, str], tuple[int, bool]] = field(default_factory=dict)
    launching: set[str] = field(default_factory=set)
    """Nodes whose next RUNNING is a QEMU this qlinkd started, with every link up."""

    @property
    def name(self) -> str:
        return self.plan.name

    def running(self, node: str) -> bool:
        supervisor = self.supervisors.get(node)
        return supervisor is not None and supervisor.status.state == VmState.RUNNING

    def carrier(self, link: Link, node: str) -> tuple[bool, str]:
        """Whether `node`'s end of `link` should have carrier, and why not."""
        if link.key in self.record.links_down:
            return False, "down (admin)"
        interface = next(end.interface for end in link.endpoints if end.node == node)
        peer = link.peer_of(node, interface)
        if self.record.lab.carrier_follows_peer and not self.running(peer.node):
            return False, f"down ({peer.node} not running)"
        return True, "up"

    def note_state(self, plan: NodePlan, status: VmStatus) -> None:
        """Learn a fresh QEMU's carriers (all up) from the transitions that start it."""
        if status.state == VmState.STARTING:
            self.launching.add(plan.name)
            return
        if status.state == VmState.RUNNING and plan.name in self.launching and status.pid:
            for nic in plan.nics:
                self.carriers[(plan.name, nic.interface)] = (status.pid, True)
        self.launching.discard(plan.name)


def _process_file(plan: NodePlan) -> Path:
    return plan.paths.state_dir / "process.json"


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


def _argv_difference(old: list[str], new: list[str]) -> str:
    """The options that differ, as `-m 256M → -m 512M`, `+ -netdev ...`, `- -device ...`."""

    before = [" ".join(group) for group in option_groups(old)]
    after = [" ".join(group) for group in option_groups(new)]
    removed = [item for item in before if item not in after]
    added = [item for item in after if item not in before]
    parts = [f"- {item}" for item in removed] + [f"+ {item}" for item in added]
    return "; ".join(parts) if parts else "option order changed"


class Daemon(Hooks):
    """Everything qlinkd does, callable from the control API and from tests."""

    def __init__(
        self, layout: Layout, host: HostFacts, settings: SupervisorSettings | None = None
    ) -> None:
        self.layout = layout
        self.host = host
        self.settings = settings or SupervisorSettings()
        self.labs: dict[str, LabRuntime] = {}
        self._group: asyncio.TaskGroup | None = None
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        # One `up`/`down` at a time: each plans against the allocations the last one left.
        self._lab_lock = asyncio.Lock()
        self._runtime = VmRuntime()

    # --- Hooks: what supervisors ask of the daemon --------------------------------------

    def check_ports(self, plan: NodePlan) -> None:
        for nic in plan.nics:
            check_udp_ports_free(nic.local_address, [nic.local_port])
        if plan.mgmt is not None:
            check_tcp_port_free(plan.mgmt.host_address, plan.mgmt.ssh_port)

    def prepare_files(self, plan: NodePlan) -> None:
        if plan.node.image is not None and create_overlay(
            Path(plan.node.image), plan.paths.overlay
        ):
            log.info("overlay_created", node=plan.name, overlay=str(plan.paths.overlay))
        if plan.mgmt is not None and ensure_ssh_credential(
            self.layout.ssh_key, plan.mgmt.ssh_credential
        ):
            log.info("ssh_key_ready", key=str(self.layout.ssh_key))

    def record_process(self, plan: NodePlan, identity: ProcessIdentity | None) -> None:
        path = _process_file(plan)
        if identity is None:
            path.unlink(missing_ok=True)
            return
        record = ProcessRecord(
            pid=identity.pid, start_time=identity.start_time, argv=list(identity.argv)
        )
        # Not durable (no fsync, which cost ~8 ms per launch on the event loop): the record is
        # for a qlinkd that died, and the page cache outlives it; a power loss takes the VM
        # with it, and a missing or stale record only means that VM is not adopted.
        write_json(path, record.model_dump(), durable=False)

    def state_changed(self, plan: NodePlan, status: VmStatus) -> None:
        update = {"event": "node_state", "lab": plan.lab, "node": plan.name, **status.as_dict()}
        for queue in self._subscribers:
            queue.put_nowait(update)
        runtime = self.labs.get(plan.lab)
        if runtime is not None:
            runtime.note_state(plan, status)
        if runtime is not None and self._group is not None and status.state in (
            VmState.RUNNING, VmState.STOPPING, VmState.BACKOFF, VmState.FAILED, VmState.STOPPED,
        ):  # fmt: skip
            self._group.create_task(
                self._apply_carrier(runtime, plan.name), name=f"carrier:{plan.lab}/{plan.name}"
            )

    async def _apply_carrier(self, runtime: LabRuntime, node: str) -> None:
        """Give every end of `node`'s links the carrier it should have now, where it has
        another: its own ends (a QEMU that just started has every link up) and its peers'
        (they follow it)."""
        async with runtime.carrier_lock:
            for link in runtime.record.lab.links:
                if not any(end.node == node for end in link.endpoints):
                    continue
                for end in link.endpoints:
                    await self._set_carrier(runtime, link, end.node, end.interface)

    async def _set_carrier(
        self, runtime: LabRuntime, link: Link, node: str, interface: str
    ) -> None:
        supervisor = runtime.supervisors.get(node)
        qmp = supervisor.qmp if supervisor is not None else None
        pid = supervisor.status.pid if supervisor is not None else None
        if qmp is None or pid is None:
            return  # not running: it gets its carrier when it starts
        up, reason = runtime.carrier(link, node)
        if runtime.carriers.get((node, interface)) == (pid, up):
            return  # that QEMU's NIC has it already
        netdev = runtime.plan.nodes[node].nic(interface).netdev_id
        try:
            # set_link on the netdev takes the backend down and tells the NIC, so the guest
            # sees carrier loss (virtio-net link status) and no frame passes either way.
            await qmp.execute("set_link", {"name": netdev, "up": up})
        except VmError as error:
            runtime.carriers.pop((node, interface), None)  # unknown now: the next pass sets it
            log.warning("carrier_not_set", node=node, interface=interface, error=str(error))
            return
        runtime.carriers[(node, interface)] = (pid, up)
        log.info("carrier_set", lab=runtime.name, node=node, interface=interface, up=up,
                 reason=reason)  # fmt: skip

    async def set_link(self, reference: str, up: bool) -> dict[str, Any]:
        """`link down|up NODE:IF` (or `LAB/NODE:IF`): a cut cable, both ends, remembered."""
        runtime, supervisor, interface = self.find_endpoint(reference)
        link = runtime.record.lab.link_of(supervisor.name, interface)
        if link is None:
            raise ControlError(f"{supervisor.name} has no interface {interface!r}", status=404)
        down = set(runtime.record.links_down)
        down.discard(link.key) if up else down.add(link.key)
        runtime.record = runtime.record.model_copy(update={"links_down": sorted(down)})
        self._save_record(runtime)
        async with runtime.carrier_lock:
            for end in link.endpoints:
                await self._set_carrier(runtime, link, end.node, end.interface)
        log.info("link_admin", lab=runtime.name, link=link.key, up=up)
        return self._link_row(runtime, link)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    # --- life cycle ---------------------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Adopt what runs, then run supervisors until cancelled (the VMs stay up)."""
        watcher = CreationWatcher()
        self._runtime = VmRuntime(watcher)
        async with asyncio.TaskGroup() as group:
            self._group = group
            dispatcher = group.create_task(watcher.run(), name="inotify")
            try:
                self._restore_labs()
                # Serve only once every VM left by a previous qlinkd is adopted (or known
                # gone): a `status` must never show a running VM as stopped.
                for runtime in self.labs.values():
                    for supervisor in runtime.supervisors.values():
                        await supervisor.settled.wait()
                if ready is not None:
                    ready()
                await asyncio.Future()  # until cancelled
            finally:
                for runtime in self.labs.values():
                    for task in runtime.tasks.values():
                        task.cancel()
                dispatcher.cancel()
                self._group = None
        watcher.close()

    def _restore_labs(self) -> None:
        labs_dir = self.layout.state_dir / "labs"
        for lab_file in sorted(labs_dir.glob("*/lab.json")):
            try:
                record = LabRecord.model_validate_json(lab_file.read_text())
            except (OSError, ValidationError) as error:
                log.error("lab_record_unreadable", path=str(lab_file), error=str(error))
                continue
            try:
                plan, _ = plan_lab(record.lab, self.layout, load_allocations(self.layout))
            except QlinkError as error:
                log.error("lab_restore_failed", lab=record.lab.name, error=str(error))
                continue
            runtime = LabRuntime(record, plan)
            self.labs[plan.name] = runtime
            for name, node_plan in plan.nodes.items():
                identity = self._recorded_identity(node_plan)
                self._spawn_supervisor(
                    runtime, node_plan, identity, want_running=name not in record.stopped
                )
            log.info("lab_restored", lab=plan.name, nodes=len(plan.nodes))

    def _recorded_identity(self, plan: NodePlan) -> ProcessIdentity | None:
        try:
            record = ProcessRecord.model_validate_json(_process_file(plan).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as error:
            log.warning("process_record_unreadable", node=plan.name, error=str(error))
            return None
        return ProcessIdentity(record.pid, record.start_time, tuple(record.argv))

    def _spawn_supervisor(
        self,
        runtime: LabRuntime,
        plan: NodePlan,
        identity: ProcessIdentity | None,
        want_running: bool,
    ) -> VmSupervisor:
        assert self._group is not None, "the daemon is not serving"
        supervisor = VmSupervisor(
            plan, build_argv(plan, self.host), self, settings=self.settings, runtime=self._runtime
        )
        runtime.supervisors[plan.name] = supervisor
        runtime.tasks[plan.name] = self._group.create_task(
            self._guarded(supervisor, identity, want_running), name=f"vm:{plan.lab}/{plan.name}"
        )
        return supervisor

    async def _guarded(
        self, supervisor: VmSupervisor, identity: ProcessIdentity | None, want_running: bool
    ) -> None:
        """One VM's task; a bug in it must fail that VM, never the daemon and every lab."""
        try:
            await supervisor.run(identity, want_running)
        except Exception as error:  # the daemon's own boundary: log it, keep the others
            log.exception("supervisor_crashed", lab=supervisor.plan.lab, node=supervisor.name)
            supervisor.status.state = VmState.FAILED
            supervisor.status.last_error = f"internal error: {error!r}"
            supervisor.settled.set()

    # --- operations ---------------------------------------------------------------------

    def _save_record(self, runtime: LabRuntime) -> None:
        write_json(
            self.layout.lab_state_dir(runtime.name) / "lab.json",
            runtime.record.model_dump(mode="json"),
        )

    def parse(self, text: str, source: str) -> Lab:
        return parse_topology_text(text, source, file_exists=lambda path: Path(path).is_file())

    async def up(self, lab: Lab, dry_run: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Bring a lab to what its file says; yields progress until every node runs or failed.

        All checks (plan, ports) come before anything starts, so a refused `up` changes
        nothing. On a lab that is up, only nodes whose command line changed are restarted,
        and nodes gone from the file are stopped; `dry_run` only says what would change.
        """
        async with self._lab_lock:
            previous = load_allocations(self.layout)
            busy = ports_in_use()
            plan, allocations = plan_lab(
                lab,
                self.layout,
                previous,
                busy_udp=busy.udp,
                busy_tcp=busy.tcp,
            )
            runtime = self.labs.get(lab.name)
            argvs = {name: build_argv(node, self.host) for name, node in plan.nodes.items()}
            change = self._diff(runtime, plan, argvs)
            summary = {"event": "plan", "lab": lab.name, **change.as_dict()}
            if dry_run:
                yield summary
                yield {"event": "done", "lab": lab.name, "failed": {}, "dry_run": True}
                return
            self._preflight([plan.nodes[name] for name in change.start], change.replug)
            save_allocations(self.layout, allocations)
            if runtime is None:
                runtime = LabRuntime(LabRecord(lab=lab), plan)
                self.labs[lab.name] = runtime
            keys = {link.key for link in lab.links}
            runtime.record = LabRecord(
                lab=lab,
                stopped=[n for n in runtime.record.stopped if n in plan.nodes],
                links_down=[k for k in runtime.record.links_down if k in keys],
            )
            runtime.plan = plan
            self._save_record(runtime)
            for name, supervisor in runtime.supervisors.items():
                if name in plan.nodes:
                    supervisor.plan, supervisor.argv = plan.nodes[name], argvs[name]
            yield summary

            with self.subscribe() as updates:
                for name in change.remove:
                    await self._remove_node(runtime, name)
                waiting: dict[str, asyncio.Future[VmStatus]] = {}
                for name, replug in change.replug.items():
                    if not await self._replug(runtime, name, replug):
                        waiting[name] = runtime.supervisors[name].submit("restart")
                for name in change.restart:
                    waiting[name] = runtime.supervisors[name].submit("restart")
                for name in change.start:
                    supervisor = runtime.supervisors.get(name) or self._spawn_supervisor(
                        runtime, plan.nodes[name], None, want_running=False
                    )
                    waiting[name] = supervisor.submit("start")
                async for update in self._progress(lab.name, waiting, updates):
                    yield update

    def _diff(
        self, runtime: LabRuntime | None, plan: LabPlan, argvs: dict[str, list[str]]
    ) -> LabChange:
        """What `up` has to do to a running lab, and why; changes nothing itself."""
        change = LabChange()
        if runtime is None:
            change.start = {name: "new lab" for name in plan.nodes}
            return change
        current = runtime.supervisors
        change.remove = {
            name: "not in the file any more" for name in set(current) - set(plan.nodes)
        }
        for name in plan.nodes:
            supervisor = current.get(name)
            if supervisor is None:
                change.start[name] = "new node"
                continue
            idle = supervisor.status.state in (VmState.STOPPED, VmState.FAILED)
            operator_stopped = name in runtime.record.stopped
            if supervisor.argv != argvs[name]:
                why = "command line changed: " + _argv_difference(supervisor.argv, argvs[name])
                replug = (
                    None
                    if idle
                    else nic_replug(supervisor.plan, supervisor.argv, plan.nodes[name], self.host)
                )
                if replug is not None:
                    change.replug[name] = replug
                elif not idle:
                    change.restart[name] = why
                elif not operator_stopped:
                    change.start[name] = why
            elif idle and not operator_stopped:
                change.start[name] = f"was {supervisor.status.state.value}"
        return change

    def _preflight(self, nodes: list[NodePlan], replugs: dict[str, NicReplug]) -> None:
        """Every port of every node about to start, and of every NIC about to be plugged into
        a running node, is free, or nothing changes: a plug that failed on a taken port would
        leave that node to a restart that fails the same way."""
        for plan in nodes:
            try:
                self.check_ports(plan)
            except PortInUseError as error:
                raise ControlError(
                    f"cannot start {plan.lab}/{plan.name}: {error}; nothing was started",
                    status=409,
                ) from error
            except HostError as error:
                raise ControlError(f"cannot start {plan.lab}/{plan.name}: {error}", 409) from error
        for name, replug in replugs.items():
            # A recabled NIC keeps its port, which the running QEMU holds until the unplug.
            held = {nic.local_port for nic in replug.unplug}
            for nic in replug.plug:
                if nic.local_port in held:
                    continue
                try:
                    check_udp_ports_free(nic.local_address, [nic.local_port])
                except PortInUseError as error:
                    raise ControlError(
                        f"cannot plug {name}:{nic.interface}: {error}; nothing was changed",
                        status=409,
                    ) from error

    async def _progress(
        self,
        lab: str,
        waiting: dict[str, asyncio.Future[VmStatus]],
        updates: asyncio.Queue[dict[str, Any]],
    ) -> AsyncIterator[dict[str, Any]]:
        pending = set(waiting)
        failed: dict[str, str] = {}
        while pending:
            getter = asyncio.ensure_future(updates.get())
            watched: set[asyncio.Future[Any]] = {getter, *(waiting[name] for name in pending)}
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                update = getter.result()
                if update.get("lab") == lab:
                    yield update
            else:
                getter.cancel()
            for name in list(pending):
                future = waiting[name]
                if future.done():
                    pending.discard(name)
                    if future.exception() is not None:
                        failed[name] = str(future.exception())
        while not updates.empty():
            update = updates.get_nowait()
            if update.get("lab") == lab:
                yield update
        yield {"event": "done", "lab": lab, "failed": failed}

    async def _replug(self, runtime: LabRuntime, name: str, replug: NicReplug) -> bool:
        """Take NICs out of a running node and put others in; False if it needs a restart.

        The supervisor already holds the new plan and argv, so should the VM restart or crash
        meanwhile, it comes back with the new NICs anyway.
        """
        supervisor = runtime.supervisors[name]
        qmp, pid = supervisor.qmp, supervisor.status.pid
        if qmp is None or pid is None:
            return True  # not running after all: it starts with the new command line
        plan = supervisor.plan
        try:
            for nic in replug.unplug:
                runtime.carriers.pop((name, nic.interface), None)
                await qmp.unplug(nic.device_id, timeout=self.settings.unplug_timeout)
                await qmp.execute("netdev_del", {"id": nic.netdev_id})
            for nic in replug.plug:
                await qmp.execute("netdev_add", nic_netdev_options(nic))
                await qmp.execute("device_add", nic_device_options(plan, nic))
                runtime.carriers[(name, nic.interface)] = (pid, True)  # a new NIC is up
        except VmError as error:
            if supervisor.status.pid != pid:
                return True  # replaced meanwhile, by a QEMU with the new command line
            log.warning("replug_failed", lab=runtime.name, node=name, error=str(error))
            return False
        log.info("nics_replugged", lab=runtime.name, node=name, change=replug.describe())
        await self._apply_carrier(runtime, name)
        return True

    async def _remove_node(self, runtime: LabRuntime, name: str) -> None:
        supervisor = runtime.supervisors.pop(name)
        with contextlib.suppress(QlinkError):
            await supervisor.submit("stop")
        runtime.tasks.pop(name).cancel()

    async def down(self, lab_name: str) -> AsyncIterator[dict[str, Any]]:
        async with self._lab_lock:
            runtime = self.labs.get(lab_name)
            if runtime is None:
                raise ControlError(f"no lab named {lab_name!r} is up", status=404)
            with self.subscribe() as updates:
                waiting = {name: sup.submit("stop") for name, sup in runtime.supervisors.items()}
                async for update in self._progress(lab_name, waiting, updates):
                    yield update
            for task in runtime.tasks.values():
                task.cancel()
            del self.labs[lab_name]
            (self.layout.lab_state_dir(lab_name) / "lab.json").unlink(missing_ok=True)
            log.info("lab_down", lab=lab_name)

    def find_endpoint(self, reference: str) -> tuple[LabRuntime, VmSupervisor, str]:
        """`NODE:IF` or `LAB/NODE:IF`: the node's lab, its supervisor, the interface."""
        node_ref, sep, interface = reference.rpartition(":")
        if not sep:
            raise ControlError(f"say NODE:INTERFACE, not {reference!r}", status=400)
        runtime, supervisor = self.find_node(node_ref)
        return runtime, supervisor, interface

    def find_node(self, reference: str) -> tuple[LabRuntime, VmSupervisor]:
        """`node` or `lab/node`; a bare name must be unambiguous."""
        lab_name, _, node_name = reference.rpartition("/")
        matches = [
            (runtime, runtime.supervisors[node_name])
            for runtime in self.labs.values()
            if node_name in runtime.supervisors and lab_name in ("", runtime.name)
        ]
        if not matches:
            raise ControlError(f"no node {reference!r} in any lab that is up", status=404)
        if len(matches) > 1:
            labs = ", ".join(runtime.name for runtime, _ in matches)
            raise ControlError(
                f"node {node_name!r} is in several labs ({labs}): say LAB/{node_name}", 409
            )
        return matches[0]

    async def node_command(self, reference: str, verb: str, graceful: bool = True) -> VmStatus:
        runtime, supervisor = self.find_node(reference)
        if verb not in ("start", "stop", "restart"):
            raise ControlError(f"unknown verb {verb!r}", status=400)
        stopped = set(runtime.record.stopped)
        stopped.discard(supervisor.name) if verb != "stop" else stopped.add(supervisor.name)
        if stopped != set(runtime.record.stopped):
            runtime.record = runtime.record.model_copy(update={"stopped": sorted(stopped)})
            self._save_record(runtime)
        try:
            return await supervisor.submit(verb, graceful)  # type: ignore[arg-type]
        except QlinkError as error:
            raise ControlError(str(error), status=500) from error

    async def qmp(self, reference: str, command: str, arguments: dict[str, Any]) -> Any:
        """A QMP command through the daemon's own connection: QEMU serves one QMP client."""
        _, supervisor = self.find_node(reference)
        qmp = supervisor.qmp
        if qmp is None:
            raise ControlError(f"{reference} is {supervisor.status.state.value}", status=409)
        try:
            return await qmp.execute(command, arguments or None, timeout=30)
        except VmError as error:
            raise ControlError(str(error), status=422) from error

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for runtime in sorted(self.labs.values(), key=lambda r: r.name):
            for name in runtime.plan.nodes:  # the file's order, every time
                supervisor = runtime.supervisors.get(name)
                if supervisor is None:
                    continue
                plan = supervisor.plan
                rows.append(
                    {
                        "lab": runtime.name,
                        "node": name,
                        **supervisor.status.as_dict(),
                        "accel": self.host.accel_for(plan.node.accel),
                        "ports": {nic.interface: nic.local_port for nic in plan.nics},
                        "ssh": (
                            f"{plan.mgmt.host_address}:{plan.mgmt.ssh_port}"
                            if plan.mgmt is not None
                            else None
                        ),
                        "qmp": str(plan.paths.qmp_socket),
                        "console": str(plan.paths.console_socket),
                    }
                )
        return rows

    def links(self) -> list[dict[str, Any]]:
        return [
            self._link_row(runtime, link)
            for runtime in sorted(self.labs.values(), key=lambda r: r.name)
            for link in runtime.record.lab.links
        ]

    def _link_row(self, runtime: LabRuntime, link: Link) -> dict[str, Any]:
        ends = []
        for end in link.endpoints:
            supervisor = runtime.supervisors.get(end.node)
            nic = runtime.plan.nodes[end.node].nic(end.interface)
            _, carrier = runtime.carrier(link, end.node)
            ends.append(
                {
                    "endpoint": str(end),
                    "port": nic.local_port,
                    "mac": nic.mac,
                    "pci": f"{nic.place.bus}/{nic.place.addr}",
                    "node_state": supervisor.status.state.value if supervisor else None,
                    "carrier": carrier,
                }
            )
        state = "down" if link.key in runtime.record.links_down else "up"
        return {"lab": runtime.name, "link": link.key, "admin": state, "a": ends[0], "b": ends[1]}
