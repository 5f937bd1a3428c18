"""The supervisor's state machine, fed fake processes and monitors: no QEMU, no sockets.

A real `VmSupervisor` runs as a task over a `FakeRuntime`: launches follow a script, each
process is a future the test ends (`FakeProcess.crash`), each monitor answers or hangs on
demand and yields the QMP events a test injects. Wall time inside the supervisor is a
`FakeClock` that stands still, so `next_start_at` and uptimes are exact; backoffs and
heartbeats are real but last milliseconds. Tests wait for transitions under a deadline
(`Rig.until`), never sleep and assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest

import qlink.supervisor as supervisor_module
from qlink.errors import LaunchError, NotRunning, PortInUseError, VmError
from qlink.mailbox import LifecycleCommand as CommandName
from qlink.plan.lab import NodePlan, plan_lab
from qlink.plan.paths import Layout
from qlink.policy import Backoff, Liveness, SupervisorSettings, VmStatus
from qlink.runtime.handles import MonitorHandle
from qlink.runtime.process import AdoptVerdict, ExitStatus, ProcessIdentity, StopTimeouts
from qlink.states import VmState
from qlink.supervisor import VmSupervisor
from qlink.topology import RestartPolicy, parse_topology_text
from tests.fakes import FakeClock, FakeProcess, FakeRuntime, StopCall

T = TypeVar("T")

ARGV = ["qemu-system-x86_64", "-name", "r1", "-kernel", "/k"]
SEED = 20240611
DEADLINE = 2.0
"""The longest any one wait may take; every wait here is over in milliseconds."""

STOPPED, STARTING, RUNNING = VmState.STOPPED, VmState.STARTING, VmState.RUNNING
BACKOFF, STOPPING, FAILED = VmState.BACKOFF, VmState.STOPPING, VmState.FAILED

SETTINGS = SupervisorSettings(
    backoff=Backoff(initial=0.01, factor=2.0, cap=0.04, jitter=0.2, attempts=3, healthy_after=60),
    liveness=Liveness(interval=0.01, timeout=0.01, misses=2),
    stop_timeouts=StopTimeouts(powerdown=0.05, quit=0.05, sigterm=0.05, sigkill=0.05),
    launch_timeout=1.0,
)
LONG_BACKOFF = dataclasses.replace(
    SETTINGS, backoff=dataclasses.replace(SETTINGS.backoff, initial=30.0, cap=30.0)
)
"""A backoff whose timer never fires during a test: what ends it can only be a command."""


def launch_error() -> LaunchError:
    return LaunchError("QEMU exited with status 1 during start-up", ARGV, 1, "qemu: bad option")


@functools.cache
def node_plan(restart: RestartPolicy) -> NodePlan:
    lab = parse_topology_text(
        f"name: t\nnodes:\n  r1:\n    kernel: /k\n    restart: {restart}\n", "t.yaml"
    )
    plan, _ = plan_lab(lab, Layout.under(Path("/q")))
    return plan.nodes["r1"]


class RecordingHooks:
    """Keeps a snapshot of the status after every transition, and every process record."""

    def __init__(self, refuse_ports: int = 0) -> None:
        self.history: list[VmStatus] = []
        self.records: list[ProcessIdentity | None] = []
        self.refuse_ports = refuse_ports

    @property
    def states(self) -> list[VmState]:
        return [status.state for status in self.history]

    def of(self, state: VmState) -> list[VmStatus]:
        return [status for status in self.history if status.state is state]

    async def check_ports(self, plan: NodePlan) -> None:
        if self.refuse_ports > 0:
            self.refuse_ports -= 1
            raise PortInUseError(40001, "127.0.0.1", "pid 1 (init)")

    async def prepare_files(self, plan: NodePlan) -> None:
        pass

    def record_process(self, plan: NodePlan, identity: ProcessIdentity | None) -> None:
        self.records.append(identity)

    def state_changed(self, plan: NodePlan, status: VmStatus) -> None:
        self.history.append(dataclasses.replace(status))


# --- the rig: one supervisor task, and ways to wait on it ------------------------------------


@dataclass
class Rig:
    supervisor: VmSupervisor
    runtime: FakeRuntime
    hooks: RecordingHooks
    clock: FakeClock
    task: asyncio.Task[None]

    async def settle(self, future: asyncio.Future[T]) -> T:
        """The future's result, or the supervisor task's error if the task died first."""
        watched: set[asyncio.Future[Any]] = {future, self.task}
        try:
            async with asyncio.timeout(DEADLINE):
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise AssertionError(
                f"nothing came within {DEADLINE} s; transitions: {self.hooks.states}"
            ) from None
        if future.done():
            return future.result()
        self.task.result()
        raise AssertionError(f"the supervisor task ended; transitions: {self.hooks.states}")

    async def until(self, predicate: Callable[[VmStatus], bool]) -> VmStatus:
        waiter = asyncio.ensure_future(self.supervisor.wait_for(predicate))
        try:
            return await self.settle(waiter)
        finally:
            waiter.cancel()

    async def session(self) -> MonitorHandle | None:
        """The QMP session the VM's task uses, asked of the task itself; None unless running."""

        async def own_session(qmp: MonitorHandle, pid: int) -> MonitorHandle:
            return qmp

        try:
            session: MonitorHandle = await self.settle(self.supervisor.call(own_session))
        except NotRunning:
            return None
        return session

    async def command(self, name: CommandName, graceful: bool = True) -> VmStatus:
        return await self.settle(self.supervisor.submit(name, graceful))

    async def settled(self) -> None:
        """Once the task sits idle: a stop of a VM that is not running is a no-op served in
        order, so by its answer everything before it has happened, and nothing is pending."""
        assert self.supervisor.status.state in (STOPPED, FAILED)
        history = list(self.hooks.history)
        await self.command("stop")
        assert self.hooks.history == history


@contextlib.asynccontextmanager
async def supervised(
    restart: RestartPolicy = "on-failure",
    runtime: FakeRuntime | None = None,
    *,
    settings: SupervisorSettings = SETTINGS,
    hooks: RecordingHooks | None = None,
    adopt: ProcessIdentity | None = None,
    want_running: bool = True,
) -> AsyncIterator[Rig]:
    """A supervisor task for node r1, cancelled on the way out as the daemon does; an error
    the task died of is raised here."""
    clock = FakeClock()
    runtime = runtime or FakeRuntime()
    hooks = hooks or RecordingHooks()
    supervisor = VmSupervisor(
        node_plan(restart),
        list(ARGV),
        hooks,
        settings=settings,
        rng=random.Random(SEED),
        runtime=runtime,
    )
    with mock.patch.object(supervisor_module, "time", clock):
        task = asyncio.create_task(supervisor.run(adopt, want_running), name="vm:t/r1")
        try:
            yield Rig(supervisor, runtime, hooks, clock, task)
        finally:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=DEADLINE)
            assert task in done, "the supervisor task ignored its cancellation"
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error


def is_state(state: VmState) -> Callable[[VmStatus], bool]:
    return lambda status: status.state is state


def running_after(restarts: int) -> Callable[[VmStatus], bool]:
    return lambda status: status.state is RUNNING and status.restarts == restarts


# --- Backoff, the pure part ----------------------------------------------------------------


def test_backoff_grows_by_its_factor_up_to_its_cap() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=10.0, jitter=0.0)
    rng = random.Random(SEED)
    assert [backoff.delay(failures, rng) for failures in range(7)] == [1, 1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.2, 0.5])
def test_backoff_jitter_stays_inside_its_bounds_and_spreads(jitter: float) -> None:
    backoff = Backoff(initial=0.5, factor=3.0, cap=20.0, jitter=jitter)
    rng = random.Random(SEED)
    for failures in range(1, 12):
        base = min(20.0, 0.5 * 3.0 ** (failures - 1))
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert all(base * (1 - jitter) <= delay <= base * (1 + jitter) for delay in delays)
        spread = max(delays) - min(delays)
        assert spread == 0 if jitter == 0 else spread > base * jitter  # not a constant


def test_backoff_is_reproducible_from_its_seed() -> None:
    backoff = Backoff()
    first, second = random.Random(SEED), random.Random(SEED)
    assert [backoff.delay(n, first) for n in range(1, 6)] == [
        backoff.delay(n, second) for n in range(1, 6)
    ]


def test_backoff_after_very_many_failures_is_the_cap() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.2, attempts=5000)
    assert 24.0 <= backoff.delay(1100, random.Random(SEED)) <= 36.0


# --- starting ------------------------------------------------------------------------------


async def test_a_start_goes_through_starting_to_running() -> None:
    async with supervised(want_running=False) as rig:
        assert rig.supervisor.status.state is STOPPED
        assert await rig.session() is None
        status = await rig.command("start")
        process, monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        assert (status.state, status.pid) == (RUNNING, process.pid)
        assert rig.hooks.states == [STARTING, RUNNING]
        assert rig.runtime.launches == [ARGV]
        assert rig.hooks.records == [process.identity]
        assert await rig.session() is monitor
        assert status.started_at == rig.clock.now
        assert (status.restarts, status.failures, status.last_error) == (0, 0, None)


async def test_want_running_starts_the_vm_with_no_command() -> None:
    async with supervised() as rig:
        status = await rig.until(is_state(RUNNING))
        assert status.pid == rig.runtime.processes[0].pid
        assert rig.hooks.states == [STARTING, RUNNING]


async def test_a_start_of_a_running_vm_is_answered_and_launches_nothing() -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        status = await rig.command("start")
        assert status.state is RUNNING
        assert rig.runtime.calls == ["launch"]
        assert rig.hooks.states == [STARTING, RUNNING]


async def test_a_refused_port_check_backs_off_before_any_launch() -> None:
    async with supervised(hooks=RecordingHooks(refuse_ports=1)) as rig:
        status = await rig.until(is_state(RUNNING))
        assert rig.hooks.states == [STARTING, BACKOFF, STARTING, RUNNING]
        assert rig.runtime.calls == ["launch"]  # the refused start left nothing behind
        refused = rig.hooks.of(BACKOFF)[0]
        assert refused.last_error is not None
        assert "40001" in refused.last_error
        assert status.last_error is None  # running again clears it


# --- exits and the restart policy ----------------------------------------------------------


async def test_a_crash_with_on_failure_backs_off_then_runs_again() -> None:
    async with supervised("on-failure") as rig:
        await rig.until(is_state(RUNNING))
        first = rig.runtime.processes[0]
        first.crash(1)
        status = await rig.until(running_after(1))
        second = rig.runtime.processes[1]
        assert rig.hooks.states == [STARTING, RUNNING, BACKOFF, STARTING, RUNNING]
        assert status.pid == second.pid != first.pid
        assert status.last_exit == "exited with status 1"
        assert status.failures == 1  # a quick failure counts toward FAILED
        backing_off = rig.hooks.of(BACKOFF)[0]
        assert backing_off.pid is None
        assert backing_off.next_start_at is not None
        assert backing_off.next_start_at > backing_off.since
        assert rig.hooks.of(STARTING)[1].next_start_at is None
        assert rig.runtime.monitors[0].closed
        assert rig.hooks.records == [first.identity, None, second.identity]
        assert rig.runtime.launches == [ARGV, ARGV]
        assert rig.runtime.stops == []


@pytest.mark.parametrize(
    ("policy", "returncode", "described"),
    [
        ("on-failure", 1, "exited with status 1"),
        ("on-failure", -signal.SIGKILL, "killed by SIGKILL"),
        ("on-failure", None, "exited (status unknown: not our child)"),
        ("always", 0, "exited with status 0"),
        ("always", 3, "exited with status 3"),
    ],
)
async def test_an_exit_the_policy_restarts(
    policy: RestartPolicy, returncode: int | None, described: str
) -> None:
    async with supervised(policy) as rig:
        await rig.until(is_state(RUNNING))
        rig.runtime.processes[0].crash(returncode)
        status = await rig.until(running_after(1))
        assert status.last_exit == described
        assert rig.hooks.states == [STARTING, RUNNING, BACKOFF, STARTING, RUNNING]
        assert len(rig.runtime.launches) == 2


@pytest.mark.parametrize(
    ("policy", "returncode", "final"),
    [
        ("on-failure", 0, STOPPED),
        ("never", 0, STOPPED),
        ("never", 1, FAILED),
        ("never", -signal.SIGSEGV, FAILED),
    ],
)
async def test_an_exit_the_policy_leaves_down(
    policy: RestartPolicy, returncode: int, final: VmState
) -> None:
    async with supervised(policy) as rig:
        await rig.until(is_state(RUNNING))
        process = rig.runtime.processes[0]
        process.crash(returncode)
        status = await rig.until(is_state(final))
        await rig.settled()
        assert rig.hooks.states == [STARTING, RUNNING, final]
        assert rig.runtime.calls == ["launch"]
        assert (status.pid, status.started_at, status.restarts) == (None, None, 0)
        assert status.last_exit == ExitStatus(returncode).describe()
        assert rig.hooks.records == [process.identity, None]
        assert rig.runtime.monitors[0].closed


async def test_a_crash_loop_backs_off_longer_each_time_then_fails() -> None:
    backoff = Backoff(initial=0.01, factor=2.0, cap=0.03, jitter=0.2, attempts=4)
    settings = dataclasses.replace(SETTINGS, backoff=backoff)
    runtime = FakeRuntime([launch_error()] * 10)
    async with supervised(runtime=runtime, settings=settings) as rig:
        status = await rig.until(is_state(FAILED))
        await rig.settled()
        assert len(runtime.launches) == backoff.attempts
        assert rig.hooks.states == [STARTING, BACKOFF] * 3 + [STARTING, FAILED]
        backoffs = rig.hooks.of(BACKOFF)
        assert [entry.failures for entry in backoffs] == [1, 2, 3]
        delays = [entry.next_start_at - entry.since for entry in backoffs if entry.next_start_at]
        # The same seed gives the same jitter, so the delays are known exactly...
        replay = random.Random(SEED)
        expected = [backoff.delay(n, replay) for n in (1, 2, 3)]
        assert delays == pytest.approx(expected, abs=1e-6)  # the epoch's float resolution
        # ...and they grow by the factor, capped, with the jitter inside its bounds.
        for failures, delay in enumerate(delays, start=1):
            base = min(backoff.cap, backoff.initial * backoff.factor ** (failures - 1))
            assert base * 0.8 <= delay <= base * 1.2
        assert delays[0] < delays[1]
        assert delays[2] <= backoff.cap * 1.2
        assert status.failures == backoff.attempts
        assert status.last_error is not None
        assert status.last_error.startswith("QEMU exited with status 1 during start-up")
        assert (status.pid, status.next_start_at, status.restarts) == (None, None, 0)


async def test_quick_exits_count_as_failures_until_failed() -> None:
    runtime = FakeRuntime([1, 1, 1, 1])
    async with supervised(runtime=runtime) as rig:
        status = await rig.until(is_state(FAILED))
        await rig.settled()
        assert len(runtime.launches) == SETTINGS.backoff.attempts
        assert status.failures == SETTINGS.backoff.attempts
        assert status.last_error == "exited with status 1"
        assert all(monitor.closed for monitor in runtime.monitors)


@pytest.mark.parametrize("ending", ["failed", "stopped during backoff"])
async def test_restarts_counts_only_restarts_that_happened(ending: str) -> None:
    settings = SETTINGS if ending == "failed" else LONG_BACKOFF
    runtime = FakeRuntime([1, 1, 1])
    async with supervised(runtime=runtime, settings=settings) as rig:
        if ending == "failed":
            await rig.until(is_state(FAILED))
        else:
            await rig.until(is_state(BACKOFF))
            await rig.command("stop")
        await rig.settled()
        assert rig.supervisor.status.restarts == len(runtime.launches) - 1


async def test_an_operator_start_on_failed_resets_the_count_and_retries() -> None:
    runtime = FakeRuntime([launch_error()] * 3)
    async with supervised(runtime=runtime) as rig:
        await rig.until(is_state(FAILED))
        status = await rig.command("start")
        assert status.state is RUNNING
        assert len(runtime.launches) == 4
        assert rig.hooks.states[-3:] == [FAILED, STARTING, RUNNING]
        assert rig.hooks.history[-2].failures == 0


async def test_an_operator_start_on_failed_gets_every_attempt_again() -> None:
    attempts = SETTINGS.backoff.attempts
    runtime = FakeRuntime([launch_error()] * (2 * attempts))
    async with supervised(runtime=runtime) as rig:
        await rig.until(is_state(FAILED))
        future = rig.supervisor.submit("start")
        with pytest.raises(VmError, match="r1 failed: QEMU exited with status 1"):
            await rig.settle(future)
        assert len(runtime.launches) == 2 * attempts  # not one more try: a fresh count
        assert [entry.failures for entry in rig.hooks.of(BACKOFF)] == [1, 2, 1, 2]
        assert rig.supervisor.status.state is FAILED


@pytest.mark.parametrize("healthy", [True, False])
async def test_a_vm_up_past_healthy_after_has_its_count_reset(healthy: bool) -> None:
    settings = dataclasses.replace(
        SETTINGS, backoff=dataclasses.replace(SETTINGS.backoff, attempts=2, healthy_after=30)
    )
    async with supervised(settings=settings) as rig:
        await rig.until(is_state(RUNNING))
        rig.runtime.processes[0].crash(1)  # at once: failure 1 of 2
        await rig.until(running_after(1))
        rig.clock.advance(31.0 if healthy else 29.0)
        rig.runtime.processes[1].crash(1)
        if healthy:
            status = await rig.until(running_after(2))
            assert status.failures == 1  # the healthy run wiped the earlier failure
        else:
            status = await rig.until(is_state(FAILED))
            assert status.failures == 2


# --- commands while backing off ------------------------------------------------------------


@pytest.mark.parametrize("name", ["stop", "kill"])
async def test_a_stop_during_backoff_stops_and_nothing_launches(name: CommandName) -> None:
    runtime = FakeRuntime([launch_error()])
    async with supervised(runtime=runtime, settings=LONG_BACKOFF) as rig:
        await rig.until(is_state(BACKOFF))
        status = await rig.command(name)
        assert status.state is STOPPED
        assert status.next_start_at is None
        await rig.settled()
        assert runtime.calls == ["launch"]
        assert runtime.stops == []
        assert rig.hooks.states == [STARTING, BACKOFF, STOPPED]


async def test_a_start_during_backoff_retries_at_once() -> None:
    runtime = FakeRuntime([launch_error()])
    async with supervised(runtime=runtime, settings=LONG_BACKOFF) as rig:
        await rig.until(is_state(BACKOFF))
        status = await rig.command("start")  # well before the 30 s timer
        assert status.state is RUNNING
        assert rig.hooks.states == [STARTING, BACKOFF, STARTING, RUNNING]


async def test_a_start_being_served_fails_when_stopped_during_backoff() -> None:
    runtime = FakeRuntime([launch_error()])
    async with supervised(runtime=runtime, settings=LONG_BACKOFF, want_running=False) as rig:
        start = rig.supervisor.submit("start")
        await rig.until(is_state(BACKOFF))
        assert not start.done()
        stopped = await rig.command("stop")
        assert stopped.state is STOPPED
        with pytest.raises(VmError, match="stopped while backing off"):
            await rig.settle(start)


# --- stop, restart, kill -------------------------------------------------------------------


async def test_a_stop_takes_the_graceful_ladder_to_stopped() -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        process, monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        status = await rig.command("stop")
        assert status.state is STOPPED
        assert rig.runtime.stops == [StopCall(process, monitor, graceful=True)]
        assert status.last_exit == "stopped by system_powerdown"
        assert rig.hooks.states == [STARTING, RUNNING, STOPPING, STOPPED]
        assert rig.hooks.records == [process.identity, None]
        assert monitor.closed
        await rig.settled()
        assert rig.runtime.calls == ["launch", "stop"]


async def test_a_restart_stops_gracefully_then_relaunches_the_same_argv() -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        first, first_monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        status = await rig.command("restart")
        second = rig.runtime.processes[1]
        assert (status.state, status.pid) == (RUNNING, second.pid)
        assert second.pid != first.pid
        assert rig.runtime.stops == [StopCall(first, first_monitor, graceful=True)]
        assert rig.runtime.calls == ["launch", "stop", "launch"]
        assert rig.runtime.launches == [ARGV, ARGV]
        assert rig.runtime.alive_at_launch[1] == []  # the old QEMU was gone first
        assert first_monitor.closed
        assert await rig.session() is rig.runtime.monitors[1]
        assert rig.hooks.states == [STARTING, RUNNING, STOPPING, STARTING, RUNNING]
        assert rig.hooks.records == [first.identity, None, second.identity]
        assert (status.restarts, status.failures) == (1, 0)


async def test_a_forced_restart_skips_the_graceful_step() -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        first, monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        status = await rig.command("restart", graceful=False)
        assert status.state is RUNNING
        assert rig.runtime.stops == [StopCall(first, monitor, graceful=False)]
        assert status.pid == rig.runtime.processes[1].pid


@pytest.mark.parametrize("graceful", [True, False])
async def test_a_kill_passes_no_qmp_and_is_never_graceful(graceful: bool) -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        process = rig.runtime.processes[0]
        status = await rig.command("kill", graceful=graceful)
        assert status.state is STOPPED
        assert rig.runtime.stops == [StopCall(process, None, graceful=False)]
        assert status.last_exit == "stopped by SIGKILL"
        await rig.settled()
        assert rig.runtime.calls == ["launch", "stop"]


async def test_a_stop_that_fails_leaves_the_vm_running_and_fails_the_command() -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        rig.runtime.stop_error = VmError("QEMU pid 1000 survived SIGKILL for 10 s")
        with pytest.raises(VmError, match="survived SIGKILL"):
            await rig.command("stop")
        assert rig.hooks.states == [STARTING, RUNNING, STOPPING, RUNNING]
        assert rig.supervisor.status.pid == rig.runtime.processes[0].pid
        assert rig.hooks.records == [rig.runtime.processes[0].identity]
        # Still served: the next stop works.
        rig.runtime.stop_error = None
        assert (await rig.command("stop")).state is STOPPED


# --- QMP: events and the heartbeat ---------------------------------------------------------


@pytest.mark.parametrize("event", ["RESET", "SHUTDOWN", "GUEST_PANICKED", "STOP", "POWERDOWN"])
async def test_a_qmp_event_is_recorded_and_changes_nothing(event: str) -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        process, monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        monitor.inject(event, guest=True, reason="guest-reset")
        async with asyncio.timeout(DEADLINE):
            await monitor.drained()
        status = await rig.command("start")  # a no-op: by its answer all is handled
        assert status.last_event == event
        assert (status.state, status.pid) == (RUNNING, process.pid)
        assert rig.runtime.calls == ["launch"]
        assert process.signals == []
        assert not process.exited
        assert rig.hooks.states == [STARTING, RUNNING]


@pytest.mark.parametrize(("policy", "final"), [("on-failure", RUNNING), ("never", FAILED)])
async def test_a_hung_monitor_gets_the_process_killed_and_handled_as_a_crash(
    policy: RestartPolicy, final: VmState
) -> None:
    async with supervised(policy) as rig:
        await rig.until(is_state(RUNNING))
        process, monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        monitor.hang = lambda index: True
        status = await rig.until(running_after(1) if final is RUNNING else is_state(FAILED))
        assert process.signals == [signal.SIGKILL]
        assert monitor.commands.count("query-status") >= SETTINGS.liveness.misses
        assert rig.runtime.stops == []  # straight to SIGKILL, not the stop ladder
        assert monitor.closed
        assert status.last_exit == "killed by SIGKILL"
        if final is RUNNING:
            assert rig.hooks.states == [STARTING, RUNNING, BACKOFF, STARTING, RUNNING]
            assert status.pid == rig.runtime.processes[1].pid
        else:
            assert rig.hooks.states == [STARTING, RUNNING, FAILED]
            assert status.last_error is not None
            assert status.last_error.startswith("hung: QMP query-status got no answer")


async def test_single_missed_heartbeats_do_not_add_up() -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        process, monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        monitor.hang = lambda index: index % 2 == 0  # every other one, never two in a row
        async with asyncio.timeout(DEADLINE):
            await monitor.wait_commands(8)
        assert process.signals == []
        assert rig.supervisor.status.state is RUNNING


# --- adoption ------------------------------------------------------------------------------

ADOPTED = ProcessIdentity(4242, 1_600_000_000.0, tuple(ARGV))


async def adoptable_runtime() -> tuple[FakeRuntime, FakeProcess]:
    """A runtime whose `adopt` proves the recorded process to be this VM."""
    runtime, process = FakeRuntime(), FakeProcess(ADOPTED)
    runtime.adoptable = (AdoptVerdict.ADOPTED, process)
    return runtime, process


async def test_an_adopted_vm_runs_with_its_pid_and_no_launch() -> None:
    runtime, adopted = await adoptable_runtime()
    async with supervised(runtime=runtime, adopt=ADOPTED) as rig:
        status = await rig.until(is_state(RUNNING))
        assert (status.pid, status.started_at) == (ADOPTED.pid, ADOPTED.start_time)
        assert runtime.calls == ["adopt", "connect"]
        assert rig.hooks.states == [RUNNING]
        assert rig.hooks.records == []  # the record that led here stays as it is
        assert await rig.session() is runtime.monitors[0]
        assert (adopted.signals, adopted.exited) == ([], False)


async def test_an_adopted_vm_that_exits_is_handled_like_a_crash() -> None:
    runtime, adopted = await adoptable_runtime()
    async with supervised(runtime=runtime, adopt=ADOPTED) as rig:
        await rig.until(is_state(RUNNING))
        adopted.crash(None)  # not our child: no return code
        status = await rig.until(running_after(1))
        assert status.pid == runtime.processes[0].pid
        assert status.last_exit == "exited (status unknown: not our child)"
        assert rig.hooks.states == [RUNNING, BACKOFF, STARTING, RUNNING]
        assert runtime.monitors[0].closed


async def test_an_adopted_vm_restarts_on_command() -> None:
    runtime, adopted = await adoptable_runtime()
    async with supervised(runtime=runtime, adopt=ADOPTED) as rig:
        await rig.until(is_state(RUNNING))
        status = await rig.command("restart")
        assert (status.state, status.pid) == (RUNNING, runtime.processes[0].pid)
        assert runtime.stops == [StopCall(adopted, runtime.monitors[0], True)]
        assert runtime.calls == ["adopt", "connect", "stop", "launch"]
        assert runtime.alive_at_launch == [[]]
        assert status.restarts == 1


@pytest.mark.parametrize("verdict", [AdoptVerdict.STRANGER, AdoptVerdict.GONE])
@pytest.mark.parametrize("want_running", [True, False])
async def test_a_process_not_adopted_is_forgotten_and_the_vm_started_if_wanted(
    verdict: AdoptVerdict, want_running: bool
) -> None:
    runtime = FakeRuntime()
    runtime.adoptable = (verdict, None)
    async with supervised(runtime=runtime, adopt=ADOPTED, want_running=want_running) as rig:
        if want_running:
            status = await rig.until(is_state(RUNNING))
            assert status.pid == runtime.processes[0].pid != ADOPTED.pid
            assert runtime.calls == ["adopt", "launch"]
            assert rig.hooks.records == [None, runtime.processes[0].identity]
        else:
            await rig.settled()
            assert runtime.calls == ["adopt"]
            assert rig.hooks.states == []
            assert rig.hooks.records == [None]


async def test_an_adopted_vm_deaf_to_qmp_is_killed_and_relaunched() -> None:
    runtime, adopted = await adoptable_runtime()
    runtime.connect_error = VmError("QMP at /q/run/t/r1/qmp.sock did not answer")
    async with supervised(runtime=runtime, adopt=ADOPTED) as rig:
        status = await rig.until(is_state(RUNNING))
        assert runtime.stops == [StopCall(adopted, None, graceful=False)]
        assert runtime.calls == ["adopt", "connect", "stop", "launch"]
        assert runtime.alive_at_launch == [[]]
        assert status.pid == runtime.processes[0].pid
        assert rig.hooks.records == [None, runtime.processes[0].identity]
        assert rig.hooks.states == [STARTING, RUNNING]


# --- commands racing an exit ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "name", "final", "launches"),
    [
        (1, "stop", STOPPED, 1),
        (0, "kill", STOPPED, 1),
        (0, "start", RUNNING, 2),
        (1, "restart", RUNNING, 2),
        (1, "start", RUNNING, 2),
    ],
)
async def test_a_command_arriving_with_an_exit_is_not_lost(
    returncode: int, name: CommandName, final: VmState, launches: int
) -> None:
    # The command arrives while QEMU starts, and QEMU is dead by the time it is watched:
    # the supervisor sees the exit and the command in the same instant.
    runtime = FakeRuntime([returncode])
    runtime.gate.clear()
    async with supervised(runtime=runtime, settings=LONG_BACKOFF) as rig:
        await rig.until(is_state(STARTING))
        future = rig.supervisor.submit(name)
        runtime.gate.set()
        status = await rig.settle(future)
        assert status.state is final
        assert len(runtime.launches) == launches
        assert rig.runtime.processes[0].exited


async def test_a_command_arriving_with_a_crash_of_a_running_vm_is_not_lost() -> None:
    async with supervised(settings=LONG_BACKOFF) as rig:
        await rig.until(is_state(RUNNING))
        rig.runtime.processes[0].crash(1)
        status = await rig.command("stop")
        assert status.state is STOPPED
        await rig.settled()
        assert rig.runtime.calls in (["launch"], ["launch", "stop"])


async def test_commands_arriving_with_an_exit_keep_their_order() -> None:
    runtime = FakeRuntime([1, None])
    runtime.gate.clear()
    async with supervised(runtime=runtime) as rig:
        await rig.until(is_state(STARTING))
        finished: list[str] = []
        stop = rig.supervisor.submit("stop")
        stop.add_done_callback(lambda _: finished.append("stop"))
        start = rig.supervisor.submit("start")
        start.add_done_callback(lambda _: finished.append("start"))
        runtime.gate.set()
        await rig.settle(stop)
        await rig.settle(start)
        assert finished == ["stop", "start"]
        assert rig.supervisor.status.state is RUNNING  # the operator's last word was start


# --- the daemon going away -----------------------------------------------------------------


async def test_cancelling_the_task_hangs_up_qmp_and_leaves_the_vm_running() -> None:
    async with supervised() as rig:
        await rig.until(is_state(RUNNING))
        process, monitor = rig.runtime.processes[0], rig.runtime.monitors[0]
        rig.task.cancel()
        done, _ = await asyncio.wait({rig.task}, timeout=DEADLINE)
        assert rig.task in done
        assert rig.task.cancelled()
        assert monitor.closed
        assert process.signals == []
        assert not process.exited
        assert rig.runtime.stops == []
        assert rig.hooks.records == [process.identity]  # kept, for the next qlinkd to adopt
        assert rig.hooks.states == [STARTING, RUNNING]


async def test_cancelling_during_backoff_ends_quietly() -> None:
    runtime = FakeRuntime([1])
    async with supervised(runtime=runtime, settings=LONG_BACKOFF) as rig:
        await rig.until(is_state(BACKOFF))
        rig.task.cancel()
        done, _ = await asyncio.wait({rig.task}, timeout=DEADLINE)
        assert rig.task in done
        assert rig.task.cancelled()
        assert runtime.calls == ["launch"]


async def test_a_stopped_process_reported_by_the_scan_is_replaced() -> None:
    """SIGSTOP leaves QMP silent, yet a probe every 30 s took a minute to notice it: the
    daemon's scan of /proc reports it, and the VM's own task replaces it."""
    settings = dataclasses.replace(SETTINGS, liveness=Liveness(interval=60.0))
    async with supervised(settings=settings) as rig:
        first_pid = (await rig.until(is_state(RUNNING))).pid
        assert first_pid is not None
        process = rig.runtime.processes[0]
        assert not rig.supervisor.process_stopped()
        process.send_signal(signal.SIGSTOP)
        assert rig.supervisor.process_stopped()
        rig.supervisor.report_stopped(first_pid + 1000)  # another QEMU's: ignored
        rig.supervisor.report_stopped(first_pid)
        status = await rig.until(running_after(1))
        assert status.pid != first_pid
        assert signal.SIGKILL in process.signals
        assert rig.runtime.monitors[0].commands == []  # no QMP probe was needed
        assert "stopped (SIGSTOP)" in (rig.hooks.of(BACKOFF)[0].last_error or "")
