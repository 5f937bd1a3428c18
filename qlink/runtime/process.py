"""One QEMU process: launch it all-or-nothing, watch its exit, stop it by a ladder, adopt it.

A VM must outlive qlinkd, so QEMU runs in its own session with its output in a log file, and
is watched through a pidfd: the same way whether qlinkd started it or adopted it after a
restart. The process exit is the truth; a QMP EOF is only a symptom.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from asyncinotify import Inotify, Mask

from qlink.errors import HostError, LaunchError, PortInUseError, QmpCommandError, VmError
from qlink.plan.node_paths import NodePaths
from qlink.runtime.hold import HeldStart
from qlink.runtime.links import (
    LinkSocket,
    check_descriptor_limit,
    highest_descriptor,
    open_link_sockets,
    placement_actions,
)
from qlink.runtime.ports import udp_port_holder
from qlink.runtime.priority import LaunchPriority
from qlink.runtime.procfs import read_cmdline, read_stat
from qlink.runtime.qmp import QmpSession
from qlink.runtime.tools import run_tool

log = structlog.get_logger(__name__)

STDERR_TAIL_BYTES = 4096


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """What makes a PID this VM and not a stranger that reused the number."""

    pid: int
    start_time: float
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How QEMU ended; `returncode` is unknown for a process that was not our child."""

    returncode: int | None

    @property
    def clean(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            return "exited (status unknown: not our child)"
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exited with status {self.returncode}"


class QemuProcess:
    """A QEMU process watched through a pidfd; signals go through the pidfd too, so a
    signal can never reach a process that reused the PID."""

    def __init__(self, identity: ProcessIdentity, pidfd: int, is_child: bool) -> None:
        self.identity = identity
        self._pidfd = pidfd
        self._is_child = is_child
        self._exit: asyncio.Future[ExitStatus] | None = None

    @property
    def pid(self) -> int:
        return self.identity.pid

    @property
    def exited(self) -> bool:
        return self.exit_status is not None

    @property
    def exit_status(self) -> ExitStatus | None:
        """How it ended, once it has; None while it runs."""
        if self._exit is None or not self._exit.done():
            return None
        return self._exit.result()

    async def wait(self) -> ExitStatus:
        """Until the process is gone (reaped if it is our child).

        Cancelling a waiter never cancels the watch itself: every waiter gets a shield.
        """
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            loop.add_reader(self._pidfd, self._on_exit)
        return await asyncio.shield(self._exit)

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        status = ExitStatus(self._reap())
        os.close(self._pidfd)
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(status)

    def _reap(self) -> int | None:
        if not self._is_child:
            return None
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        except ChildProcessError:
            return None
        if result is None:
            return None
        if result.si_code == os.CLD_EXITED:
            return result.si_status
        return -result.si_status

    def stopped(self) -> bool:
        if self.exited:
            return False  # its PID may be someone else's by now
        try:
            return read_stat(self.pid).state == "T"  # not `t`: a debugger holds it on purpose
        except (FileNotFoundError, ProcessLookupError):
            return False

    def send_signal(self, signum: signal.Signals) -> None:
        if self.exited:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)


# --- before launch ------------------------------------------------------------------------


async def create_overlay(image: Path, overlay: Path) -> bool:
    """A qcow2 overlay on `image`, unless it exists; returns whether one was created."""
    if overlay.exists():
        return False
    if not image.is_file():
        raise HostError(f"image {image} does not exist")
    returncode, stdout, stderr = await run_tool(["qemu-img", "info", "--output=json", str(image)])
    if returncode != 0:
        raise HostError(f"qemu-img cannot read {image}: {stderr.strip()}")
    backing_format = _json_field(stdout, "format")
    overlay.parent.mkdir(parents=True, exist_ok=True)
    partial = overlay.with_suffix(".partial")
    returncode, _, stderr = await run_tool(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(image),
         str(partial)],
    )  # fmt: skip
    if returncode != 0:
        partial.unlink(missing_ok=True)
        raise HostError(f"qemu-img could not create {overlay}: {stderr.strip()}")
    partial.rename(overlay)
    return True


def _json_field(text: str, field: str) -> str:
    value = json.loads(text).get(field)
    if not isinstance(value, str):
        raise HostError(f"qemu-img info gave no {field}")
    return value


def prepare_directories(paths: NodePaths) -> None:
    paths.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)


# --- launch -------------------------------------------------------------------------------


def _spawn(argv: Sequence[str], log_path: Path, handover: Sequence[tuple[int, int]] = ()) -> int:
    """Start QEMU in a session of its own, output appended to its log; returns the PID.

    `handover` is (descriptor here, number in QEMU) for each NIC socket: the argv names them
    by number (`-netdev dgram,local.str=N`), so each is placed exactly there.

    posix_spawn, not subprocess: subprocess keeps its own books of children and may reap
    one behind our back, which would steal the exit status the pidfd watcher needs.

    It runs on the event loop. CPython's posix_spawn keeps the GIL until the child has
    exec'd (vfork semantics: ~0.5 ms idle, 15-20 ms on a loaded host), so a worker thread
    would stall the loop just the same, and add a hop.
    """
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        actions = placement_actions([(null_fd, 0), (log_fd, 1), (log_fd, 2), *handover])
        check_descriptor_limit(highest_descriptor(actions))
        return os.posix_spawnp(
            argv[0], list(argv), dict(os.environ), file_actions=actions, setsid=True
        )
    except OSError as error:
        raise LaunchError(f"cannot start {argv[0]}: {error}", argv, None, "") from error
    finally:
        os.close(log_fd)
        os.close(null_fd)


async def _spawn_with_links(
    argv: Sequence[str], log_path: Path, links: Sequence[LinkSocket]
) -> int:
    """`_spawn`, handing QEMU a socket per NIC, opened here and closed here once QEMU has its
    copies: nothing is left open if any of them cannot be opened, or QEMU cannot be started."""
    try:
        with open_link_sockets(links) as sockets:
            handover = [(sock.fileno(), link.fd) for sock, link in zip(sockets, links, strict=True)]
            return _spawn(argv, log_path, handover)
    except PortInUseError as error:
        # Named off the loop: finding the holder walks every process's descriptors.
        holder = await asyncio.to_thread(udp_port_holder, error.port)
        raise PortInUseError(error.port, error.address, holder) from error


def _tail(path: Path, start: int) -> str:
    with contextlib.suppress(OSError), path.open("rb") as handle:
        handle.seek(max(start, path.stat().st_size - STDERR_TAIL_BYTES))
        return handle.read().decode(errors="replace")
    return ""


class CreationWatcher:
    """One inotify instance that every launch shares.

    The kernel lets a user hold 128 inotify instances (fs.inotify.max_user_instances): a lab
    that launches more VMs at once than that must not open one per launch. `run` dispatches
    events and must be running (a task the daemon owns) while `created` is awaited.
    """

    def __init__(self) -> None:
        self._inotify = Inotify()
        self._watches: dict[Path, tuple[Any, int]] = {}
        self._waiters: dict[Path, asyncio.Future[None]] = {}

    def close(self) -> None:
        self._inotify.close()

    async def run(self) -> None:
        async for event in self._inotify:
            if event.path is None:
                continue
            waiter = self._waiters.get(Path(event.path))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    @contextlib.contextmanager
    def expecting(self, path: Path) -> Iterator[asyncio.Future[None]]:
        """A future resolved when `path` is created; the watch lasts as long as the block."""
        directory = path.parent
        watch, users = self._watches.get(directory, (None, 0))
        if watch is None:
            watch = self._inotify.add_watch(directory, Mask.CREATE | Mask.MOVED_TO)
        self._watches[directory] = (watch, users + 1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[path] = waiter
        try:
            yield waiter
        finally:
            self._waiters.pop(path, None)
            watch, users = self._watches.pop(directory)
            if users > 1:
                self._watches[directory] = (watch, users - 1)
            else:
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(watch)


@contextlib.asynccontextmanager
async def _private_watcher() -> AsyncIterator[CreationWatcher]:
    """A watcher for one launch outside the daemon (tests, tools); qlinkd shares one."""
    watcher = CreationWatcher()
    # Owned here and awaited on the way out; not a TaskGroup, which would wrap the launch's
    # own LaunchError in an ExceptionGroup.
    dispatcher = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        dispatcher.cancel()
        await asyncio.wait([dispatcher])  # never raises, so a cancellation of ours survives
        watcher.close()


async def launch(
    argv: Sequence[str],
    paths: NodePaths,
    timeout: float = 30.0,
    qmp_name: str = "qlink",
    watcher: CreationWatcher | None = None,
    *,
    links: Sequence[LinkSocket] = (),
    priority: LaunchPriority | None = None,
    held: HeldStart | None = None,
) -> tuple[QemuProcess, QmpSession]:
    """Start QEMU and return it with QMP connected, or raise `LaunchError` leaving nothing.

    `links` are the NIC sockets its argv expects (`runtime.links`): opened, handed over at
    their descriptor numbers, and closed here; a port someone holds is a `PortInUseError`.
    `priority` is told QEMU's PID once spawned and once its QMP answered (when it may drop
    below qlinkd: `runtime.priority`). `held`, for an argv that starts the CPUs stopped
    (`-S`), says when to run them (`runtime.hold`); the launch returns once they run.

    Readiness is an event, not a poll: QEMU creates its chardevs in command-line order, each
    bound and listening before the next, and the plan puts QMP before the console. So the
    console socket appearing (inotify) means QMP listens; the exit of QEMU ends the wait too.
    """
    try:
        async with contextlib.AsyncExitStack() as stack:
            if watcher is None:
                watcher = await stack.enter_async_context(_private_watcher())
            return await _launch(
                argv, paths, timeout, qmp_name, watcher=watcher, links=links, priority=priority,
                held=held,
            )  # fmt: skip
    except OSError as error:
        # Host trouble before QEMU ran (a directory, a watch, a file descriptor limit) is a
        # failed launch like any other: the supervisor backs off, the daemon stays up.
        raise LaunchError(f"cannot launch: {error}", argv, None, "") from error


EXIT_GRACE = 1.0
"""After QMP broke off during a launch, how long QEMU gets to show that it exited."""


async def _launch(
    argv: Sequence[str],
    paths: NodePaths,
    timeout: float,
    qmp_name: str,
    *,
    watcher: CreationWatcher,
    links: Sequence[LinkSocket],
    priority: LaunchPriority | None,
    held: HeldStart | None,
) -> tuple[QemuProcess, QmpSession]:
    prepare_directories(paths)
    for stale in (paths.qmp_socket, paths.console_socket, paths.pidfile):
        stale.unlink(missing_ok=True)
    log_start = paths.qemu_log.stat().st_size if paths.qemu_log.exists() else 0
    # The launch's timeline (monotonic seconds), logged with `qemu_spawned`: where a boot
    # storm's time goes (spawn, QMP listening, greeting and capabilities).
    marks = {"launch": time.monotonic()}
    with watcher.expecting(paths.console_socket) as console_created:
        pid = await _spawn_with_links(argv, paths.qemu_log, links)
        marks["spawned"] = time.monotonic()
        if priority is not None:
            priority.spawned(pid)
        process = _child(pid, argv)
        try:
            async with asyncio.timeout(timeout):
                exited = asyncio.ensure_future(process.wait())
                try:
                    await asyncio.wait(
                        (console_created, exited), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    exited.cancel()
                if (status := process.exit_status) is not None:
                    raise LaunchError(
                        f"QEMU {status.describe()} during start-up",
                        argv,
                        status.returncode,
                        _tail(paths.qemu_log, log_start),
                    )
                marks["listening"] = time.monotonic()
                qmp = await QmpSession.connect(qmp_name, paths.qmp_socket, timeout)
                marks["qmp_ready"] = time.monotonic()
                if held is not None:
                    await _run_when_released(qmp, held, marks)
        except BaseException as error:
            # QEMU makes its chardevs before its devices: one that refuses a device (or its
            # memory) exits right after QMP listened. Its exit and its own words are the
            # cause, not the QMP connection it broke off.
            gone = isinstance(error, VmError) and await _gone_within(process, EXIT_GRACE)
            await _reap_failed_launch(process)
            failure = _launch_failure(
                error, process.exit_status if gone else None, argv, timeout,
                (paths.qemu_log, log_start),
            )  # fmt: skip
            if failure is error:
                raise
            raise failure from error
    if priority is not None:
        priority.answered(pid)
    log.info("qemu_spawned", pid=pid, argv=list(argv), marks=marks)
    return process, qmp


def _launch_failure(
    error: BaseException,
    exit_status: ExitStatus | None,
    argv: Sequence[str],
    timeout: float,
    log: tuple[Path, int],
) -> BaseException:
    """What a launch that failed after the spawn raises: QEMU's exit and its own words (the
    tail of its `log` from the given offset) when it is gone, else what it did not do. A
    cancellation, or anything else, goes on as it is, without reading the log."""
    if isinstance(error, LaunchError):
        return error
    if exit_status is None and not isinstance(error, TimeoutError | VmError):
        return error
    output = _tail(*log)
    if exit_status is not None:
        return LaunchError(
            f"QEMU {exit_status.describe()} during start-up", argv, exit_status.returncode, output
        )
    if isinstance(error, QmpCommandError):  # it refused `cont`
        return LaunchError(f"QEMU did not run its CPUs: {error}", argv, None, output)
    return LaunchError(f"QEMU did not become ready within {timeout:g} s", argv, None, output)


async def _run_when_released(qmp: QmpSession, held: HeldStart, marks: dict[str, float]) -> None:
    """Run the CPUs of a QEMU started with `-S` (`cont`) once `held` releases them; the
    session is closed on any failure here (the caller reaps the QEMU)."""
    try:
        await held.released()
        marks["released"] = time.monotonic()
        await qmp.execute("cont")
        marks["cpus_running"] = time.monotonic()
    except BaseException:
        await qmp.close()
        raise


async def run_if_never_run(qmp: QmpSession) -> None:
    """A QEMU adopted with its CPUs never run (a qlinkd that ended between its launch and
    `cont`; QMP says `prelaunch`) runs now. One paused later (`stop`) stays as it is."""
    status = await qmp.execute("query-status")
    if isinstance(status, dict) and status.get("status") == "prelaunch":
        await qmp.execute("cont")
        log.info("qemu_cpus_run_on_adoption")


async def _reap_failed_launch(process: QemuProcess) -> None:
    process.send_signal(signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await process.wait()


def _child(pid: int, argv: Sequence[str]) -> QemuProcess:
    pidfd = os.pidfd_open(pid)
    try:
        # Our child and not reaped yet, so its /proc entry is there even if it died already.
        start_time = read_stat(pid).start_time
    except (FileNotFoundError, ProcessLookupError):
        start_time = 0.0  # reaped behind our back (SIGCHLD ignored); the pidfd reports the exit
    return QemuProcess(ProcessIdentity(pid, start_time, tuple(argv)), pidfd, is_child=True)


# --- adoption -----------------------------------------------------------------------------


class AdoptVerdict(enum.Enum):
    ADOPTED = "adopted"
    GONE = "gone"
    STRANGER = "stranger"


def adopt(identity: ProcessIdentity) -> tuple[AdoptVerdict, QemuProcess | None]:
    """Take over a VM a previous qlinkd started, after proving it is that VM.

    The PID alone proves nothing (PIDs are reused), so the start time and the full command
    line must match what was recorded when it was launched. A zombie counts as gone.
    """
    try:
        candidate = read_stat(identity.pid)
        if candidate.state in ("Z", "X"):
            return AdoptVerdict.GONE, None
        matches = (
            abs(candidate.start_time - identity.start_time) < 0.05
            and read_cmdline(identity.pid) == identity.argv
        )
    except (FileNotFoundError, ProcessLookupError):
        return AdoptVerdict.GONE, None
    except PermissionError:
        return AdoptVerdict.STRANGER, None
    if not matches:
        return AdoptVerdict.STRANGER, None
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return AdoptVerdict.GONE, None
    # It could have died and its PID been reused between the check and pidfd_open: check
    # again now that the pidfd pins the process. Ticks, not seconds: the boot time moves
    # when the clock is set.
    try:
        same = read_stat(identity.pid).start_ticks == candidate.start_ticks
    except (FileNotFoundError, ProcessLookupError):
        same = False
    if not same:
        os.close(pidfd)
        return AdoptVerdict.GONE, None
    return AdoptVerdict.ADOPTED, QemuProcess(identity, pidfd, is_child=False)


# --- stop ladder --------------------------------------------------------------------------


class StopStep(enum.Enum):
    ALREADY_GONE = "already_gone"
    POWERDOWN = "system_powerdown"
    QUIT = "quit"
    SIGTERM = "SIGTERM"
    SIGKILL = "SIGKILL"


@dataclass(frozen=True, slots=True)
class StopTimeouts:
    powerdown: float = 30.0
    powerdown_retry: float = 2.0
    quit: float = 5.0
    sigterm: float = 5.0
    sigkill: float = 10.0


async def _gone_within(process: QemuProcess, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await process.wait()
    except TimeoutError:
        return False
    return True


async def _guest_runs(qmp: QmpSession) -> bool:
    """Whether the vCPUs run: a paused VM (`-S`, `stop`, a guest error) cannot answer an ACPI
    power-down, so waiting for one is waiting for nothing."""
    try:
        status = await qmp.execute("query-status", timeout=2.0)
    except VmError:
        return True  # unknown: give the guest its chance
    return bool(isinstance(status, dict) and status.get("running", True))


async def stop(
    process: QemuProcess,
    qmp: QmpSession | None,
    timeouts: StopTimeouts = StopTimeouts(),
    graceful: bool = True,
) -> StopStep:
    """Stop QEMU by the gentlest step that works; returns the step that did it.

    ACPI power-down first (repeated: a guest still booting does not listen yet; skipped for a
    paused VM, which cannot answer it), then QMP `quit`, then SIGTERM, then SIGKILL; each
    waits for the process itself to be gone.
    """
    if process.exited:
        return StopStep.ALREADY_GONE
    if graceful and qmp is not None and timeouts.powerdown > 0 and await _guest_runs(qmp):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.powerdown
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(VmError):
                await qmp.execute("system_powerdown", timeout=min(left, 2.0))
            if await _gone_within(process, min(left, timeouts.powerdown_retry)):
                return StopStep.POWERDOWN
    if qmp is not None and qmp.connected:
        with contextlib.suppress(VmError):
            await qmp.execute("quit", timeout=timeouts.quit)
        if await _gone_within(process, timeouts.quit):
            return StopStep.QUIT
    process.send_signal(signal.SIGTERM)
    if await _gone_within(process, timeouts.sigterm):
        return StopStep.SIGTERM
    process.send_signal(signal.SIGKILL)
    if await _gone_within(process, timeouts.sigkill):
        return StopStep.SIGKILL
    raise VmError(f"QEMU pid {process.pid} survived SIGKILL for {timeouts.sigkill:g} s")
