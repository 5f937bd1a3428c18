"""The measurements, in one run on one machine: qlink against the bare launcher.

Order of work:

    bring-up, paused   each size: runs alternate which side goes first; every run is torn down
    restart            in the restart-sized paused lab, left up by its last bring-up run
    daemon cost        in the idle-sized lab, likewise; then the same VMs re-adopted by a
                       qlinkd with the liveness probe effectively off, to show what it costs
    bring-up, booting  the test guest booting; for the ready sizes, until every guest is ready
    boot storm         `qlinkctl status` and `restart` while the storm's guests boot

The bare launcher (`bench.bare.launch`) runs inside this process, its imports done before any
clock starts: the physical limit is spawning the argv and waiting for each QMP greeting.
qlink and the bare launcher share one root (so their argv, paths and ports are the same) and
never run at once. Everything started is torn down at the end, even on failure or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import bare
from bench.consoles import ReadyWatch
from bench.daemon import LogFollower, Qlinkd
from bench.procs import (
    BenchError,
    busy_udp_ports,
    cpu_seconds,
    kill_all,
    memory_bytes,
    qemu_under,
    run_timed,
)
from bench.results import (
    BringupPoint,
    IdleFigures,
    IdleResult,
    RestartResult,
    Results,
    StormResult,
)
from bench.timeline import lab_timelines, summarise
from bench.topology import BenchLab, chunked, labs_for
from qlink.policy import Liveness

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIVENESS = Liveness().interval  # what qlinkd runs with when not told
QUIET_LIVENESS = 3600.0
# qlinkd as it ships: the stop ladder's ACPI step is skipped for a paused VM by qlinkd itself,
# so `down` of a paused lab is measured as users meet it. Booting labs go down with --force.
DAEMON_ARGS: tuple[str, ...] = ()
EXIT_UNREACHABLE = 3  # qlinkctl's exit status when qlinkd does not answer
RESTART_PID = re.compile(r"running pid (\d+)")
# The idle figure's fallback when its lab cannot come up in one `up`: labs of this size, on
# ports past every bring-up lab's block.
IDLE_PART = 100
PART_PORT_OFFSET = 1600
BOOT_PORT_OFFSET = 3200  # the booting labs' block, past the paused labs' and the parts'


@dataclass(frozen=True, slots=True)
class Settings:
    mode: str
    sizes: tuple[int, ...]
    boot_sizes: tuple[int, ...]
    ready_sizes: tuple[int, ...]
    runs: int
    restart_nodes: int
    restart_runs: int
    idle_nodes: int
    cpu_window: float
    settle: float
    status_runs: int
    fixed_runs: int
    quiet_liveness: bool
    storm_nodes: int
    storm_runs: int
    storm_status: int
    memory: int
    kernel: Path
    port_base: int
    launch_timeout: float = 900.0
    guest_timeout: float = 900.0
    daemon_args: tuple[str, ...] = ()
    """Extra qlinkd arguments, to compare a setting (`--qlinkd-arg`)."""

    @classmethod
    def full(cls, kernel: Path) -> Settings:
        return cls(
            mode="full", sizes=(20, 50, 100, 200), boot_sizes=(20, 50, 100), ready_sizes=(20, 50),
            runs=7, restart_nodes=20, restart_runs=7, idle_nodes=200, cpu_window=60.0,
            settle=5.0, status_runs=20, fixed_runs=10, quiet_liveness=True, storm_nodes=20,
            storm_runs=7, storm_status=5, memory=32, kernel=kernel, port_base=28000,
        )  # fmt: skip

    @classmethod
    def quick(cls, kernel: Path) -> Settings:
        return cls(
            mode="quick", sizes=(4, 8), boot_sizes=(4,), ready_sizes=(), runs=2,
            restart_nodes=4, restart_runs=2, idle_nodes=8, cpu_window=5.0, settle=1.0,
            status_runs=10, fixed_runs=3, quiet_liveness=False, storm_nodes=4, storm_runs=1,
            storm_status=3, memory=32, kernel=kernel, port_base=28000,
        )  # fmt: skip


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load1() -> float:
    return os.getloadavg()[0]


def _nodes_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = document["nodes"]
    return nodes


def _bare_nodes(document: dict[str, Any]) -> dict[str, bare.BareNode]:
    return {name: bare.BareNode.from_plan(name, node) for name, node in _nodes_of(document).items()}


def _console_logs(document: dict[str, Any]) -> dict[str, Path]:
    return {name: Path(node["paths"]["console_log"]) for name, node in _nodes_of(document).items()}


class Bench:
    """One benchmark run: its root, its qlinkd, and everything it has up at any moment."""

    def __init__(self, settings: Settings, results: Results, top: Path) -> None:
        self.settings = settings
        self.results = results
        self.top = top
        """Holds every root of the run: a fresh one is used after qlinkd dies."""
        self.roots = 0
        self.root = self._next_root()
        self.daemon = Qlinkd(self.root, DAEMON_ARGS)
        self.labs_up: set[str] = set()
        self.bare_pids: set[int] = set()
        self.previous_death = ""
        self.lab_kinds: dict[str, str] = {}
        """Lab name → its timeline's heading ("paused N=20"), for the labs qlink brought up."""
        self.bringup_windows: dict[str, list[tuple[float, float]]] = {}
        """Lab name → when its timed bring-up runs went (monotonic): the timeline is theirs
        alone, not the warm-up's or the boot storm's, which `up` the same lab."""

    def _next_root(self) -> Path:
        root = self.top / f"r{self.roots}"
        root.mkdir()
        self.roots += 1
        return root

    # --- pieces -------------------------------------------------------------------------

    async def start_daemon(self, *extra: str) -> float:
        await self.daemon.stop()
        self.daemon = Qlinkd(self.root, [*DAEMON_ARGS, *self.settings.daemon_args, *extra])
        return await self.daemon.start()

    async def plan(self, topology: Path, name: str) -> tuple[Path, dict[str, Any]]:
        """`qlinkctl plan FILE -o json` on the benchmark's root, saved for reference."""
        document: dict[str, Any] = json.loads(
            (await self.daemon.ctl("plan", str(topology), "-o", "json")).stdout
        )
        path = self.root / f"{name}.plan.json"
        path.write_text(json.dumps(document))
        return path, document

    def write_lab(self, lab: BenchLab) -> Path:
        path = self.root / f"{lab.name}.yaml"
        path.write_text(lab.yaml(self.settings.kernel, self.settings.memory))
        self.lab_kinds[lab.name] = f"{lab.workload} N={lab.nodes}"
        return path

    def assert_quiet(self) -> None:
        """Nothing of ours runs: a run never competes with the previous one's VMs."""
        if leftovers := qemu_under(self.top):
            raise BenchError(f"QEMU still running before a run: {[p.pid for p in leftovers]}")

    async def qlink_up(
        self, topology: Path, lab: str, nodes: int, alone: bool = True
    ) -> tuple[float, float]:
        """`qlinkctl up FILE` then `qlinkctl status -o json`: (up alone, both) in seconds.

        `alone`: no other VM of ours may run (a timed run); False for a lab added to others."""
        if alone:
            self.assert_quiet()
        started = time.perf_counter()
        self.labs_up.add(lab)
        up = await self.daemon.ctl("up", str(topology), timeout=self.settings.launch_timeout)
        rows = [row for row in await self.daemon.status() if row["lab"] == lab]
        total = time.perf_counter() - started
        states = {row["node"]: row["state"] for row in rows}
        if len(rows) != nodes or set(states.values()) != {"running"}:
            raise BenchError(f"after `up`, status of {lab} is not all running: {states}")
        return up.seconds, total

    async def qlink_down(self, lab: str, force: bool = False) -> float:
        flags = ("--force",) if force else ()
        result = await self.daemon.ctl("down", *flags, lab, timeout=self.settings.launch_timeout)
        self.labs_up.discard(lab)
        return result.seconds

    def check_same_argv(self, document: dict[str, Any]) -> None:
        """The argv qlinkd launched (recorded for re-adoption) is the one the plan printed."""
        for name, node in _nodes_of(document).items():
            record = Path(node["paths"]["console_log"]).parent / "process.json"
            launched = json.loads(record.read_text())["argv"]
            if launched != node["argv"]:
                raise BenchError(f"{name}: qlinkd launched another argv than `qlinkctl plan`")

    def check_ports_free(self, document: dict[str, Any]) -> None:
        """The bare launcher does not check (that is qlink's job); the benchmark does, once
        before each bare run, so a port another lab holds is an error, not a silent steal."""
        ends = [
            nic["local"].rsplit(":", 1)
            for node in _nodes_of(document).values()
            for nic in node["nics"]
        ]
        busy = [
            port
            for address in {address for address, _ in ends}
            for port in busy_udp_ports(address, [int(p) for a, p in ends if a == address])
        ]
        if busy:
            raise BenchError(f"UDP ports of the plan are in use by someone else: {busy}")

    async def bare_up(
        self, document: dict[str, Any], answered: bool = False
    ) -> tuple[float, dict[str, int]]:
        """The in-process launcher on the plan: (seconds until every greeting, or with
        `answered` every answer to the first command, PIDs).

        The checks come before the clock: the launcher itself checks nothing."""
        self.assert_quiet()
        self.check_ports_free(document)
        nodes = list(_bare_nodes(document).values())
        started = time.perf_counter()
        try:
            pids = await bare.launch(nodes, self.settings.launch_timeout, answered=answered)
        except (bare.BareError, BaseExceptionGroup) as error:
            raise BenchError(f"bare launch: {bare.describe(error)}") from None
        seconds = time.perf_counter() - started
        self.bare_pids.update(pids.values())
        return seconds, pids

    async def bare_restart(
        self, document: dict[str, Any], node: str, pid: int, answered: bool = False
    ) -> int:
        """SIGKILL one node's QEMU, wait until it is gone, relaunch its argv: the new PID."""
        await bare.kill_and_wait(pid, self.settings.launch_timeout)
        self.bare_pids.discard(pid)
        new = await bare.launch(
            [_bare_nodes(document)[node]], self.settings.launch_timeout, answered=answered
        )
        self.bare_pids.add(new[node])
        return new[node]

    async def bare_down(self) -> None:
        await kill_all(self.bare_pids, self.top)
        self.bare_pids.clear()

    async def reset(self) -> bool:
        """After a failed section: take down whatever it left, so the next one starts clean.

        Returns whether qlinkd had died (then the run goes on under a fresh root)."""
        if self.daemon.alive:
            probe = await self.daemon.ctl("status", check=False, timeout=60)
            if probe.returncode == EXIT_UNREACHABLE:
                await self.daemon.stop()  # dying but not gone yet: finish it
        died = not self.daemon.alive
        if not died:
            for lab in sorted(self.labs_up):
                await self.daemon.ctl("down", "--force", lab, timeout=300, check=False)
        self.labs_up.clear()
        await self.bare_down()
        if died:
            # Its labs are recorded under its root, and the next qlinkd would restore them
            # (and may die the same way): sweep, and go on with a fresh root.
            await kill_all([process.pid for process in qemu_under(self.top)], self.top)
            self.previous_death = self.daemon.death_cause()
            self.root = self._next_root()
            progress(f"qlinkd died; going on with a fresh root {self.root}")
            await self.start_daemon()
        return died

    async def failed(self, name: str, error: Exception) -> None:
        """Record why a measurement failed, and take down whatever it left."""
        message = str(error) or type(error).__name__
        if isinstance(error, BaseExceptionGroup):
            message = "; ".join(str(inner) for inner in error.exceptions)
        cause = ""
        try:
            if await self.reset():
                cause = f"qlinkd died ({self.previous_death}); "
        finally:
            self.results.errors.setdefault(name, cause + message)
            progress(f"{name} FAILED: {cause}{message}")

    @contextlib.asynccontextmanager
    async def section(self, name: str) -> AsyncIterator[None]:
        """A measurement that may fail without losing the others: its error is reported."""
        try:
            yield
        except Exception as error:  # recorded in the report; the run goes on
            await self.failed(name, error)

    # --- 1. bring-up --------------------------------------------------------------------

    async def warm_up(self, lab: BenchLab) -> None:
        """One untimed run of each side: the kernel file and Python's caches get warm."""
        topology = self.write_lab(lab)
        _, document = await self.plan(topology, lab.name)
        await self.qlink_up(topology, lab.name, lab.nodes)
        await self.qlink_down(lab.name, force=lab.booting)
        await self.bare_up(document)
        await self.bare_down()

    async def bringup(self, lab: BenchLab, keep_up: bool, ready: bool) -> None:
        point = BringupPoint(lab.nodes, lab.workload)
        self.results.bringup.append(point)
        topology = self.write_lab(lab)
        _, document = await self.plan(topology, lab.name)
        # Untimed: the first launch of N VMs runs slower than the ones after it, whoever makes
        # it (measured at N=200: the bare launcher 0.9, 1.3 and 3.0 s slower than its median
        # in three runs; qlink 1.6 to 1.9 s, three times out of three when it went first), and
        # it would land on whichever side went first.
        point.first_launch, _ = await self.bare_up(document)
        await self.bare_down()
        label = f"bring-up {lab.workload} N={lab.nodes}"
        progress(f"{label} first launch (bare, untimed): {point.first_launch:.2f} s")
        runs = self.settings.runs
        qlink_failed = False
        began = time.monotonic()
        try:
            for run in range(runs):
                last = run == runs - 1
                # Alternate who goes first; a lab kept up for what follows must be qlink's.
                qlink_first = run % 2 == 0 and not (keep_up and last)
                sides = (
                    ("qlink", "bare", "answered") if qlink_first else ("answered", "bare", "qlink")
                )
                for side in sides:
                    point.loads.append(load1())
                    if side == "qlink" and not qlink_failed:
                        try:
                            await self._bringup_qlink(
                                point, topology, document, lab, check=run == 0,
                                keep_up=keep_up and last, ready=ready,
                            )  # fmt: skip
                        except Exception as error:  # the bare side still gives its figures
                            qlink_failed = True
                            await self.failed(f"{label} (qlink)", error)
                            # The root may be a fresh one now: plan again for the bare launcher.
                            topology = self.write_lab(lab)
                            _, document = await self.plan(topology, lab.name)
                    elif side == "bare":
                        await self._bringup_bare(point, document, ready)
                    elif side == "answered":
                        seconds, _ = await self.bare_up(document, answered=True)
                        point.bare_answered.add(seconds)
                        await self.bare_down()
                progress(
                    f"{label} run {run + 1}/{runs}: {_run_summary(point)} (load {load1():.1f})"
                )
        finally:
            self.bringup_windows.setdefault(lab.name, []).append((began, time.monotonic()))

    async def _bringup_qlink(
        self,
        point: BringupPoint,
        topology: Path,
        document: dict[str, Any],
        lab: BenchLab,
        *,
        check: bool,
        keep_up: bool,
        ready: bool,
    ) -> None:
        # The console logs are read on qlink's side in the first run alone, as a check of
        # qlinkd's own report: this process reading 20 logs as guests write them a byte at a
        # time takes CPU from the guests, which the timed runs must not pay twice (qlinkd
        # reads them too).
        watch = ReadyWatch(_console_logs(document)) if ready and check else None
        follower = LogFollower(self.daemon.log_path, from_end=True)
        ready_task: asyncio.Task[list[dict[str, Any]]] | None = None
        if watch is not None:
            watch.start()
        if ready:
            ready_task = asyncio.create_task(
                follower.wait_for(
                    lambda e: e.get("event") == "vm_ready" and e.get("lab") == lab.name,
                    lab.nodes, self.settings.guest_timeout,
                )
            )  # fmt: skip
        started = time.perf_counter()
        try:
            up_only, total = await self.qlink_up(topology, lab.name, lab.nodes)
            point.qlink.add(up_only)
            point.qlink_with_status.add(total)
            if watch is not None:
                consoles = await watch.wait(self.settings.guest_timeout)
                point.qlink_console_ready.add(max(consoles.values()))
            if ready_task is not None:
                await ready_task
                point.qlink_ready.add(time.perf_counter() - started)
        finally:
            if ready_task is not None:
                ready_task.cancel()
        if check:
            self.check_same_argv(document)
        if not keep_up:
            point.down.add(await self.qlink_down(lab.name, force=lab.booting))

    async def _bringup_bare(
        self, point: BringupPoint, document: dict[str, Any], ready: bool
    ) -> None:
        watch = ReadyWatch(_console_logs(document)) if ready else None
        if watch is not None:
            watch.start()
        seconds, _ = await self.bare_up(document)
        point.bare.add(seconds)
        if watch is not None:
            # The watch started with the launch (its own start is before the clock's by
            # microseconds), so its figure is from the launch too.
            point.bare_ready.add(max((await watch.wait(self.settings.guest_timeout)).values()))
        await self.bare_down()

    async def ensure_up(self, lab: BenchLab) -> None:
        if lab.name not in self.labs_up:
            await self.qlink_up(self.write_lab(lab), lab.name, lab.nodes)

    # --- 2. restart ---------------------------------------------------------------------

    async def restart_qlink(self, lab: BenchLab, result: RestartResult) -> None:
        await self.ensure_up(lab)
        pids = {row["node"]: row["pid"] for row in await self.daemon.status()}
        names = lab.node_names()
        for run in range(self.settings.restart_runs):
            node = names[run % len(names)]
            result.loads.append(load1())
            done = await self.daemon.ctl("restart", "--force", f"{lab.name}/{node}")
            result.qlink.add(done.seconds)
            match = RESTART_PID.search(done.stdout)
            if match is None or int(match.group(1)) == pids[node]:
                raise BenchError(f"restart of {node} did not report a new running PID: {done}")
            pids[node] = int(match.group(1))
            # The daemon's share: the same restart asked on the control socket from here.
            path = f"/nodes/{lab.name}/{names[(run + 1) % len(names)]}/restart?force=1"
            result.api.add(await self.daemon.get_seconds(path, method="POST"))
        progress(f"restart qlink: median {result.qlink.median * 1000:.0f} ms")

    async def restart_bare(self, lab: BenchLab, result: RestartResult) -> None:
        _, document = await self.plan(self.write_lab(lab), lab.name)
        _, pids = await self.bare_up(document)
        names = lab.node_names()
        for run in range(self.settings.restart_runs):
            node = names[run % len(names)]
            result.loads.append(load1())
            started = time.perf_counter()
            pids[node] = await self.bare_restart(document, node, pids[node])
            result.bare.add(time.perf_counter() - started)
            started = time.perf_counter()
            pids[node] = await self.bare_restart(document, node, pids[node], answered=True)
            result.bare_answered.add(time.perf_counter() - started)
        await self.bare_down()
        progress(f"restart bare: median {result.bare.median * 1000:.0f} ms")

    # --- 3. daemon cost -----------------------------------------------------------------

    async def daemon_figures(self, liveness: float) -> IdleFigures:
        """qlinkd's RSS and its CPU (utime + stime) over the window, from /proc."""
        pid = self.daemon.pid
        figures = IdleFigures(liveness, load=load1())
        before = cpu_seconds(pid)
        started = time.perf_counter()
        await asyncio.sleep(self.settings.cpu_window)  # the measurement window itself
        figures.cpu_seconds = cpu_seconds(pid) - before
        figures.window_seconds = time.perf_counter() - started
        memory = memory_bytes(pid)
        figures.rss_bytes, figures.peak_rss_bytes = memory["VmRSS"], memory["VmHWM"]
        return figures

    async def idle(self, lab: BenchLab, result: IdleResult) -> None:
        parts: list[BenchLab] = []
        if lab.name not in self.labs_up:
            # Its bring-up failed: the same number of VMs, in labs small enough to come up.
            parts = chunked(lab.nodes, IDLE_PART, self.settings.port_base + PART_PORT_OFFSET)
            for part in parts:
                await self.qlink_up(self.write_lab(part), part.name, part.nodes, alone=False)
            result.note = (
                f"{lab.name} could not be brought up (see bring-up), so these {lab.nodes} VMs "
                f"were brought up as {len(parts)} labs of at most {IDLE_PART}"
            )
        try:
            await self._idle(lab, result)
        finally:
            for part in parts:
                if part.name in self.labs_up:
                    await self.qlink_down(part.name)

    async def _idle(self, lab: BenchLab, result: IdleResult) -> None:
        # Let the bring-up's aftermath (log writes, first liveness round) pass.
        await asyncio.sleep(self.settings.settle)
        result.default = await self.daemon_figures(DEFAULT_LIVENESS)
        progress(
            f"idle N={lab.nodes}: RSS {result.default.rss_bytes / 1e6:.1f} MB, "
            f"CPU {result.default.cpu_percent:.2f}%"
        )
        for _ in range(self.settings.status_runs):
            done = await self.daemon.ctl("status", "-o", "json")
            if len(json.loads(done.stdout)) < lab.nodes:
                raise BenchError("status lists fewer nodes than the lab has")
            result.status.add(done.seconds)
            result.status_get.add(await self.daemon.get_seconds("/status"))
        progress(f"status N={lab.nodes}: p95 {result.status.percentile(0.95) * 1000:.0f} ms")
        if not self.settings.quiet_liveness:
            return
        # The same VMs, re-adopted by a qlinkd that probes liveness once an hour.
        await self.start_daemon("--liveness-interval", str(QUIET_LIVENESS))
        started = time.perf_counter()
        adopted = await LogFollower(self.daemon.log_path).wait_for(
            lambda event: event.get("event") in ("vm_adopted", "vm_not_adopted"),
            lab.nodes,
            timeout=300,
        )
        if any(event["event"] != "vm_adopted" for event in adopted):
            raise BenchError("the new qlinkd did not re-adopt every VM")
        result.adopt_seconds = time.perf_counter() - started
        await asyncio.sleep(self.settings.settle)
        result.quiet = await self.daemon_figures(QUIET_LIVENESS)
        progress(f"idle N={lab.nodes}, liveness off: CPU {result.quiet.cpu_percent:.2f}%")
        await self.start_daemon()  # the defaults again for what follows

    async def fixed_costs(self) -> None:
        """What every command pays before doing anything: the interpreter, and qlinkctl."""
        for _ in range(self.settings.fixed_runs):
            done = await run_timed([sys.executable, "-c", "pass"])
            self.results.interpreter.add(done.check().seconds)
        await self.daemon.ctl("status")  # untimed: the first writes qlinkctl's bytecode cache
        for _ in range(self.settings.fixed_runs):
            self.results.status_empty.add((await self.daemon.ctl("status", "-o", "json")).seconds)

    # --- 4. the control plane in a boot storm -------------------------------------------

    async def storm(self, lab: BenchLab, result: StormResult) -> None:
        """Each run starts N booting guests (untimed) and, while they boot, times `status`
        and a restart of one node: qlinkctl on qlink's side, kill + relaunch on the bare's."""
        topology = self.write_lab(lab)
        _, document = await self.plan(topology, lab.name)
        names = lab.node_names()
        for run in range(self.settings.storm_runs):
            node = names[run % len(names)]
            for side in ("qlink", "bare") if run % 2 == 0 else ("bare", "qlink"):
                result.loads.append(load1())
                if side == "qlink":
                    await self._storm_qlink(topology, lab, node, result)
                else:
                    _, pids = await self.bare_up(document)
                    started = time.perf_counter()
                    await self.bare_restart(document, node, pids[node])
                    result.bare_restart.add(time.perf_counter() - started)
                    await self.bare_down()
            progress(
                f"storm run {run + 1}: status p95 so far "
                f"{result.status.percentile(0.95) * 1000:.0f} ms, restart qlink "
                f"{result.qlink_restart.values[-1] * 1000:.0f} ms, bare "
                f"{result.bare_restart.values[-1] * 1000:.0f} ms (load {load1():.1f})"
            )

    async def _storm_qlink(
        self, topology: Path, lab: BenchLab, node: str, result: StormResult
    ) -> None:
        self.assert_quiet()
        self.labs_up.add(lab.name)
        await self.daemon.ctl("up", str(topology), timeout=self.settings.launch_timeout)
        pid = 0
        for _ in range(self.settings.storm_status):
            done = await self.daemon.ctl("status", "-o", "json")
            result.status.add(done.seconds)
            rows = json.loads(done.stdout)
            pid = next(r["pid"] for r in rows if r["lab"] == lab.name and r["node"] == node)
        done = await self.daemon.ctl("restart", "--force", f"{lab.name}/{node}")
        result.qlink_restart.add(done.seconds)
        match = RESTART_PID.search(done.stdout)
        if match is None or int(match.group(1)) == pid:
            raise BenchError(f"restart of {node} did not report a new running PID: {done}")
        await self.qlink_down(lab.name, force=True)

    # --- the whole run ------------------------------------------------------------------

    async def run(self) -> None:
        settings = self.settings
        await self.start_daemon()
        async with self.section("fixed costs"):
            await self.fixed_costs()
        await self._paused()
        booting = labs_for(
            list(settings.boot_sizes), settings.port_base + BOOT_PORT_OFFSET, booting=True
        )
        for size, lab in sorted(booting.items()):
            async with self.section(f"bring-up booting N={size}"):
                await self.bringup(lab, keep_up=False, ready=size in settings.ready_sizes)
        if settings.storm_nodes:
            storm_lab = (
                booting.get(settings.storm_nodes)
                or labs_for(
                    [settings.storm_nodes], settings.port_base + BOOT_PORT_OFFSET, booting=True
                )[settings.storm_nodes]
            )
            self.results.storm = StormResult(settings.storm_nodes)
            async with self.section("boot storm"):
                await self.storm(storm_lab, self.results.storm)
        self.collect_timelines()

    async def _paused(self) -> None:
        settings = self.settings
        labs = labs_for(list(settings.sizes), settings.port_base)
        if not labs:
            return  # a reduced run without paused labs
        async with self.section("warm-up"):
            await self.warm_up(labs[min(labs)])
        for size, lab in sorted(labs.items()):
            keep_up = size in (settings.restart_nodes, settings.idle_nodes)
            async with self.section(f"bring-up paused N={size}"):
                await self.bringup(lab, keep_up, ready=False)
            if size == settings.restart_nodes:
                self.results.restart = RestartResult(size)
                async with self.section("restart"):
                    await self.restart_qlink(lab, self.results.restart)
            if size == settings.idle_nodes:
                self.results.idle = IdleResult(size)
                async with self.section("daemon cost"):
                    await self.idle(lab, self.results.idle)
            if lab.name in self.labs_up:
                async with self.section(f"down N={size}"):
                    await self.qlink_down(lab.name)
            if size == settings.restart_nodes and self.results.restart is not None:
                async with self.section("restart"):
                    await self.restart_bare(lab, self.results.restart)

    def collect_timelines(self) -> None:
        """qlinkd's per-VM timeline of every `up`, by kind of lab (see bench/timeline.py)."""
        logs = sorted(self.top.glob("r*/qlinkd-*.log"))
        for name, kind in self.lab_kinds.items():
            if timelines := lab_timelines(logs, name, self.bringup_windows.get(name, [])):
                self.results.timelines[kind] = summarise(timelines)

    async def close(self) -> list[int]:
        """Tear everything down; returns the PIDs of QEMUs that had to be swept up."""
        with contextlib.suppress(Exception):
            await self.reset()
        await self.daemon.stop()
        leftovers = [process.pid for process in qemu_under(self.top)]
        await kill_all(leftovers, self.top)
        return leftovers


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        awaited: Any = task.get_coro()
        chain = []
        while awaited is not None and hasattr(awaited, "cr_frame"):
            frame = awaited.cr_frame
            if frame is not None:
                chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None)
        chain.append(repr(awaited)[:200])
        print(f"task {task.get_name()}:\n  " + "\n  ".join(chain), file=sys.stderr)


def _run_summary(point: BringupPoint) -> str:
    qlink = f"{point.qlink.values[-1]:.2f} s" if point.qlink else "failed"
    text = f"qlink up {qlink}, bare {point.bare.values[-1]:.2f} s"
    if point.bare_answered:
        text += f" (until answered {point.bare_answered.values[-1]:.2f} s)"
    if point.bare_ready:
        ready = f"{point.qlink_ready.values[-1]:.1f} s" if point.qlink_ready else "failed"
        text += f"; ready qlink {ready}, bare {point.bare_ready.values[-1]:.1f} s"
    return text


async def run_bench(settings: Settings, results: Results, top: Path) -> None:
    """Run every measurement under `top`, then tear down everything started there."""
    progress(f"root: {top}")
    # `kill -USR1 PID` prints what every task of the run waits on: a run that seems stuck
    # says where.
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    bench = Bench(settings, results, top)
    started = time.perf_counter()
    try:
        await bench.run()
    finally:
        leftovers = await bench.close()
        if leftovers:
            results.errors["teardown"] = f"QEMU left running after teardown, killed: {leftovers}"
        results.total_seconds = time.perf_counter() - started
    progress(f"done in {results.total_seconds:.0f} s")
