"""One task per VM: its state machine (`states.py`), restart policy and backoff (`policy.py`).

The task is the only writer of its VM's state and the only user of its QMP session. Everyone
else sends it a command and awaits the answer: lifecycle commands (start, stop, restart,
kill), a new plan and argv for the next launch (`configure`), and QMP work (`call`: carrier,
NIC hotplug, capture filters, the QMP passthrough), which runs only while RUNNING. So no locks
are needed, and nothing else ever talks to QEMU.

The process exit is the truth: QMP events are recorded and logged, and a QMP that stops
answering gets the process killed, whose exit then drives the state machine.

A bug in the task (an exception that is not a `QlinkError` the machine handles) is caught at
its boundary: every waiting caller is answered at once, the VM is re-adopted if its QEMU
still runs, and the task starts over after a backoff; after `TASK_CRASH_LIMIT` crashes the
VM is FAILED and every later command is refused at once. No caller ever waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from qlink.errors import Gone, NotRunning, QlinkError, VmError
from qlink.mailbox import Command, LifecycleCommand, Mailbox, VmOperation
from qlink.plan.lab import NodePlan
from qlink.policy import SupervisorSettings, VmStatus
from qlink.runtime.handles import MonitorHandle, ProcessHandle, Runtime, VmRuntime
from qlink.runtime.process import AdoptVerdict, ExitStatus, ProcessIdentity
from qlink.states import IDLE, SERVES_QMP, VmState
from qlink.vmready import ReadyWatch
from qlink.vmwatch import watch

log = structlog.get_logger(__name__)

TASK_CRASH_LIMIT = 3
"""Bugs a VM's task survives (each re-adopting its QEMU) before the VM is marked FAILED."""


class Hooks(Protocol):
    """What a supervisor asks of the daemon: port checks, files, persistence, fan-out."""

    async def check_ports(self, plan: NodePlan) -> None:
        """Raise if a port the node binds is taken."""

    async def prepare_files(self, plan: NodePlan) -> None:
        """Create the files the node's argv names: its disk overlay, its SSH credential."""

    def record_process(self, plan: NodePlan, identity: ProcessIdentity | None) -> None:
        """Remember (or forget) the running process, for re-adoption after a restart."""

    def state_changed(self, plan: NodePlan, status: VmStatus) -> None:
        """Called after every transition."""


class _VmMachine:
    """The state machine of one VM, run by its supervisor's task (see `VmSupervisor`, which
    adds the callers' side and the task's boundary)."""

    def __init__(
        self,
        plan: NodePlan,
        argv: list[str],
        hooks: Hooks,
        *,
        settings: SupervisorSettings | None = None,
        rng: random.Random | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.plan = plan
        self.argv = argv
        self.status = VmStatus()
        self._hooks = hooks
        self._settings = settings or SupervisorSettings()
        self._runtime: Runtime = runtime or VmRuntime()
        self._rng = rng or random.Random()
        self._mailbox = Mailbox()
        # The reason of the guest's last SHUTDOWN event: it tells a clean power-off from a
        # crash when the exit status is unknown (an adopted QEMU is not our child).
        self._shutdown_reason: str | None = None
        self._kill_cause: str | None = None
        self._process: ProcessHandle | None = None
        self._qmp: MonitorHandle | None = None
        self._log = log.bind(lab=plan.lab, node=plan.name)
        self._state_waiters: list[tuple[Callable[[VmStatus], bool], asyncio.Future[None]]] = []
        self._ready = ReadyWatch(plan, self.status, self._changed, self._log)
        # Set once the supervisor knows whether it adopted a running VM: before that its
        # status says nothing true, so the daemon waits for it before serving.
        self.settled = asyncio.Event()
        # Set when the task has ended for good: the node left the daemon.
        self.retired = asyncio.Event()
        self._crashes = 0  # bugs the task's boundary caught (VmSupervisor)
        self._stopped = asyncio.Event()  # set by `report_stopped`, for the running QEMU

    @property
    def name(self) -> str:
        return self.plan.name

    async def _handle_idle_command(self, command: Command) -> None:
        """A lifecycle command while nothing runs (STOPPED or FAILED)."""
        self._mailbox.serving = command
        if command.name in ("start", "restart"):
            # STOPPED/FAILED → STARTING. An operator's start clears a crash loop's count.
            self.status.failures = 0
            await self._start_with_policy(command)
        else:
            self._finish(command)  # stopping what is stopped is done already

    async def _next_command(self) -> Command:
        """The next command the state machine acts on. A new configuration is taken in any
        state; QMP work outside RUNNING is refused here, so callers never wait on it."""
        while True:
            command = await self._mailbox.take()
            if command.name == "configure":
                assert command.configuration is not None
                self.plan, self.argv = command.configuration
                self._ready.configure(self.plan)
                self._finish(command)
            elif command.name == "call" and self.status.state not in SERVES_QMP:
                self._finish(command, NotRunning(self.name, self.status.state.value))
            else:
                return command

    def _finish(self, command: Command, error: BaseException | None = None) -> None:
        if self._mailbox.serving is command:
            self._mailbox.serving = None
        command.answer(self.status, error)

    def _set_state(self, state: VmState, **changes: Any) -> None:
        previous = self.status.state
        self.status.state = state
        self.status.since = time.time()
        for key, value in changes.items():
            setattr(self.status, key, value)
        self._log.info("vm_state", state=state.value, previous=previous.value, pid=self.status.pid)
        self._changed()

    def _changed(self) -> None:
        """After any change of the status: the daemon hears of it, waiters are woken."""
        self._hooks.state_changed(self.plan, self.status)
        for predicate, future in list(self._state_waiters):
            if not future.done() and predicate(self.status):
                future.set_result(None)

    async def _start_with_policy(self, command: Command | None = None) -> None:
        """STARTING → RUNNING, through BACKOFF as often as the policy allows, and back to
        STARTING whenever the running VM ends in a way the policy restarts.

        `command` is the operator's start or restart being served: it completes when the VM
        runs, or fails when the VM ends up FAILED or STOPPED instead.
        """
        while True:
            self._mailbox.serving = command
            try:
                await self._launch_once()
            except QlinkError as error:
                self._log.warning("vm_launch_failed", error=str(error))
                retry, command = await self._backoff_or_fail(str(error), command)
                if not retry:
                    return
                continue
            if command is not None:
                if command.name == "restart":
                    self._log.info("vm_restarted", pid=self.status.pid)
                self._finish(command)
                command = None
            outcome = await self._serve_running()
            if outcome is None:
                return  # stopped on request
            if isinstance(outcome, Command):
                # STOPPING → STARTING: an operator's restart, same argv, so same MACs and ports.
                command = outcome
                self.status.restarts += 1
                self.status.failures = 0
                continue
            retry, command = await self._after_exit(outcome)
            if not retry:
                return
            self.status.restarts += 1  # counted once the policy's restart goes ahead

    async def _launch_once(self) -> None:
        # → STARTING. The checks come first, so a refused start leaves nothing behind.
        marks = {"starting": time.monotonic()}
        self._set_state(VmState.STARTING, pid=None, next_start_at=None)
        self._shutdown_reason = None
        await self._hooks.check_ports(self.plan)
        marks["ports_checked"] = time.monotonic()
        await self._hooks.prepare_files(self.plan)
        marks["files_ready"] = time.monotonic()
        self._ready.launching()
        self._stopped.clear()
        process, qmp = await self._runtime.launch(
            self.argv,
            self.plan,
            self._settings.launch_timeout,
            qmp_name=f"{self.plan.lab}/{self.plan.name}",
        )
        self._process, self._qmp = process, qmp
        marks["launched"] = time.monotonic()
        self._hooks.record_process(self.plan, process.identity)
        marks["recorded"] = time.monotonic()
        # STARTING → RUNNING: QEMU is up and its QMP answers.
        self._set_state(VmState.RUNNING, pid=process.pid, started_at=time.time(), last_error=None)
        marks["running"] = time.monotonic()
        # Monotonic seconds of each step, for where a boot storm's time goes (bench/timeline.py).
        self._log.info("vm_launch_timeline", marks=marks)

    async def _backoff_or_fail(
        self, reason: str, command: Command | None
    ) -> tuple[bool, Command | None]:
        """After a failure: BACKOFF then retry (True), or FAILED (False).

        Returns the command to complete once the VM runs: the one being served, or an
        operator's start that arrived during the backoff.
        """
        backoff = self._settings.backoff
        failures = self.status.failures + 1
        if failures >= backoff.attempts:
            # → FAILED: a crash loop stops here until an operator starts it again.
            self._set_state(
                VmState.FAILED, failures=failures, last_error=reason, pid=None, started_at=None
            )
            self._log.error("vm_failed", failures=failures, reason=reason)
            if command is not None:
                self._finish(command, VmError(f"{self.name} failed: {reason}"))
            return False, None
        delay = backoff.delay(failures, self._rng)
        # → BACKOFF
        self._set_state(
            VmState.BACKOFF,
            failures=failures,
            last_error=reason,
            pid=None,
            started_at=None,
            next_start_at=time.time() + delay,
        )
        # A command during the backoff wins over the timer: stop cancels it, start retries now.
        try:
            async with asyncio.timeout(delay):
                pending = await self._next_command()
        except TimeoutError:
            return True, command
        if pending.name in ("stop", "kill"):
            # BACKOFF → STOPPED
            self._set_state(VmState.STOPPED, next_start_at=None)
            self._finish(pending)
            if command is not None:
                self._finish(command, VmError(f"{self.name} was stopped while backing off"))
            return False, None
        if command is not None:
            self._finish(command)  # superseded by the newer start
        return True, pending

    async def _after_exit(self, exit_status: ExitStatus) -> tuple[bool, Command | None]:
        """The process ended on its own: the policy decides whether it comes back."""
        uptime = time.time() - (self.status.started_at or time.time())
        if exit_status.returncode is None and self._shutdown_reason == "guest-shutdown":
            # Not our child, so no exit code; but the guest itself asked to power off.
            exit_status = ExitStatus(0)
        self._shutdown_reason = None
        policy = self.plan.node.restart
        restart = policy == "always" or (policy == "on-failure" and not exit_status.clean)
        self.status.last_exit = exit_status.describe()
        # A QEMU the supervisor killed for hanging: the hang is the cause, not the SIGKILL.
        cause, self._kill_cause = self._kill_cause or exit_status.describe(), None
        self._log.warning("vm_exited", exit=exit_status.describe(), uptime=round(uptime, 1))
        if uptime >= self._settings.backoff.healthy_after:
            self.status.failures = 0
        if not restart:
            # RUNNING → STOPPED (a clean exit) or FAILED (a failure the policy leaves down).
            final = VmState.STOPPED if exit_status.clean else VmState.FAILED
            failed = {} if exit_status.clean else {"last_error": cause}
            self._set_state(final, pid=None, started_at=None, **failed)
            return False, None
        return await self._backoff_or_fail(cause, None)

    async def _serve_running(self) -> ExitStatus | Command | None:
        """RUNNING until something ends it. Returns the exit status of a VM that ended by
        itself, the restart command an operator gave, or None after an operator's stop."""
        async with self._ready.following():
            return await self._serve_running_loop()

    async def _serve_running_loop(self) -> ExitStatus | Command | None:
        process, qmp = self._process, self._qmp
        assert process is not None
        assert qmp is not None
        while True:
            exited, command, hung = await watch(
                process, qmp, self._next_command, self._settings.liveness, self._on_event,
                stopped=self._stopped,
            )  # fmt: skip
            if exited is not None and command is not None:
                # A command and the exit at once: the exit wins, the command goes next.
                self._mailbox.hold(command)
            if hung is not None:
                # RUNNING, hung → killed: from here on it is handled like any crash.
                self._log.error("vm_hung", reason=hung.reason)
                self._kill_cause = f"hung: {hung.reason}"
                process.send_signal(signal.SIGKILL)
                exited = await process.wait()
            if exited is not None:
                await self._forget_process()
                return exited
            assert command is not None
            if command.name == "call":
                await self._run_operation(command, qmp, process.pid)
                continue
            if command.name == "start":
                self._finish(command)  # it runs already
                continue
            self._mailbox.serving = command
            if await self._stop(command, process, qmp):
                if command.name == "restart":
                    return command
                # STOPPING → STOPPED
                self._set_state(VmState.STOPPED, pid=None, started_at=None)
                self._finish(command)
                return None

    async def _run_operation(self, command: Command, qmp: MonitorHandle, pid: int) -> None:
        """QMP work for another component. Its failure is the caller's to handle, never the
        VM's: even a bug in it only fails that call."""
        assert command.operation is not None
        self._mailbox.serving = command
        try:
            result = await command.operation(qmp, pid)
        except Exception as error:  # handed to the caller, who awaits it
            command.answer(error=error)
        else:
            command.answer(result)
        self._mailbox.serving = None

    async def _stop(self, command: Command, process: ProcessHandle, qmp: MonitorHandle) -> bool:
        """RUNNING → STOPPING, and the stop ladder; False (back to RUNNING) if it failed."""
        self._set_state(VmState.STOPPING)
        try:
            step = await self._runtime.stop(
                process,
                None if command.name == "kill" else qmp,
                self._settings.stop_timeouts,
                graceful=command.graceful and command.name != "kill",
            )
        except VmError as error:
            self._set_state(VmState.RUNNING)
            self._finish(command, error)
            return False
        self.status.last_exit = f"stopped by {step.value}"
        self._log.info("vm_stopped", step=step.value)
        await self._forget_process()
        return True

    async def _forget_process(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
        self._process, self._qmp = None, None
        self._hooks.record_process(self.plan, None)
        self._ready.gone()

    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        self.status.last_event = name
        if name == "RESET":
            # A guest reboot happens inside the same QEMU: not a crash, no restart.
            self._log.info("vm_guest_reset", guest=data.get("guest"))
            self._ready.guest_reset()
        elif name == "SHUTDOWN":
            reason = data.get("reason")
            self._shutdown_reason = reason if isinstance(reason, str) else None
            self._log.info("vm_guest_shutdown", reason=self._shutdown_reason)
        elif name == "GUEST_PANICKED":
            self._log.error("vm_guest_panicked", action=data.get("action"))
        else:
            self._log.info("vm_qmp_event", qmp_event=name, data=data)


class VmSupervisor(_VmMachine):
    """Owns one VM for the life of the daemon: the callers' side (commands into the
    mailbox) and the task, whose boundary keeps a bug here from reaching the daemon."""

    def submit(self, name: LifecycleCommand, graceful: bool = True) -> asyncio.Future[VmStatus]:
        return self._mailbox.put(Command(name, graceful))

    def process_stopped(self) -> bool:
        """Whether the running QEMU is stopped by a signal (read from /proc: no QMP)."""
        process = self._process
        return process is not None and self.status.state in SERVES_QMP and process.stopped()

    def report_stopped(self, pid: int) -> None:
        """The daemon's scan saw this VM's QEMU `pid` stopped: its task replaces it."""
        if pid == self.status.pid:
            self._stopped.set()

    def call(self, operation: VmOperation) -> asyncio.Future[Any]:
        """Run QMP work on the VM's session from its own task; fails with `NotRunning`
        unless the VM is RUNNING when the task gets to it."""
        return self._mailbox.put(Command("call", operation=operation))

    def configure(self, plan: NodePlan, argv: list[str]) -> asyncio.Future[Any]:
        """The plan and argv of the next launch (a running QEMU keeps its own)."""
        return self._mailbox.put(Command("configure", configuration=(plan, argv)))

    async def wait_for(self, predicate: Callable[[VmStatus], bool]) -> VmStatus:
        """Wait until the status satisfies `predicate` (checked after every transition)."""
        if predicate(self.status):
            return self.status
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._state_waiters.append(entry)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._state_waiters.remove(entry)
        return self.status

    async def run(self, adopt_identity: ProcessIdentity | None, want_running: bool) -> None:
        """The VM's task: adopt what a previous qlinkd left, then serve until cancelled.
        Never raises but CancelledError: a bug here is this VM's, never the daemon's."""
        with structlog.contextvars.bound_contextvars(lab=self.plan.lab, node=self.plan.name):
            try:
                await self._run_with_boundary(adopt_identity, want_running)
            finally:
                self._retire()
                # The daemon is going away, not the VM: leave QEMU running, just hang up.
                if self._qmp is not None:
                    await self._qmp.close()

    async def _run_with_boundary(
        self, adopt_identity: ProcessIdentity | None, want_running: bool
    ) -> None:
        while True:
            try:
                await self._serve(adopt_identity, want_running)
            except Exception as error:  # the task's boundary: a bug, never a lost VM
                self._crashes += 1
                self._log.exception("supervisor_crashed", crashes=self._crashes)
                self._mailbox.answer_in_flight(VmError(f"{self.name}: internal error: {error!r}"))
                self.settled.set()
                adopt_identity, want_running = await self._recover(error)
                if self._crashes >= TASK_CRASH_LIMIT:
                    await self._refuse_forever(error)

    async def _recover(self, error: Exception) -> tuple[ProcessIdentity | None, bool]:
        """After a bug: hang up QMP, keep a QEMU that still runs (the next pass adopts it),
        and wait a backoff before starting over."""
        process, qmp = self._process, self._qmp
        self._process, self._qmp = None, None
        if qmp is not None:
            with contextlib.suppress(Exception):
                await qmp.close()
        keep = process is not None and not process.exited
        want_running = self.status.state not in IDLE
        self.status.last_error = f"internal error: {error!r}"
        if self._crashes < TASK_CRASH_LIMIT:
            await asyncio.sleep(self._settings.backoff.delay(self._crashes, self._rng))
        return (process.identity if keep and process is not None else None), want_running

    async def _refuse_forever(self, error: Exception) -> None:
        # → FAILED, for good: every command is answered at once with the reason.
        self._set_state(VmState.FAILED, last_error=f"internal error: {error!r}")
        self._log.error("supervisor_gave_up", crashes=self._crashes)
        self._mailbox.close(VmError(f"{self.name} failed: internal error: {error!r}"))
        await asyncio.Future()  # until cancelled: the mailbox answers every caller

    def _retire(self) -> None:
        if self._mailbox.closed is None:
            self._mailbox.close(Gone(self.name))
        self.settled.set()
        self.retired.set()

    async def _adopt(self, identity: ProcessIdentity) -> bool:
        verdict, process = self._runtime.adopt(identity)
        if verdict is not AdoptVerdict.ADOPTED or process is None:
            self._log.info("vm_not_adopted", pid=identity.pid, verdict=verdict.value)
            self._hooks.record_process(self.plan, None)
            return False
        try:
            qmp = await self._runtime.connect(
                f"{self.plan.lab}/{self.plan.name}", self.plan, self._settings.launch_timeout
            )
        except VmError as error:
            # Alive but deaf: kill it, and let the policy bring it back.
            self._log.warning("vm_adopt_qmp_failed", pid=identity.pid, error=str(error))
            await self._runtime.stop(process, None, self._settings.stop_timeouts, graceful=False)
            self._hooks.record_process(self.plan, None)
            return False
        self._process, self._qmp = process, qmp
        self._ready.adopted()
        # Adopted VMs are running: the transition is the daemon learning it, not a start.
        self._set_state(VmState.RUNNING, pid=identity.pid, started_at=identity.start_time)
        self._log.info("vm_adopted", pid=identity.pid)
        return True

    async def _serve_adopted(self) -> None:
        """An adopted VM is served like one we started; what ends it is handled the same."""
        outcome = await self._serve_running()
        if isinstance(outcome, Command):
            self.status.restarts += 1
            await self._start_with_policy(outcome)
        elif isinstance(outcome, ExitStatus):
            retry, command = await self._after_exit(outcome)
            if retry:
                self.status.restarts += 1
                await self._start_with_policy(command)

    async def _serve(self, adopt_identity: ProcessIdentity | None, want_running: bool) -> None:
        adopted = adopt_identity is not None and await self._adopt(adopt_identity)
        self.settled.set()
        if adopted:
            await self._serve_adopted()
        elif want_running:
            await self._start_with_policy()
        while True:
            command = await self._next_command()
            await self._handle_idle_command(command)
