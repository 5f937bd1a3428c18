"""What a benchmark run measured, as plain data, and the targets it is judged against."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Repeated measurements of one quantity, in seconds unless said otherwise."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    def __bool__(self) -> bool:
        return bool(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile: the smallest value with `fraction` of them at or below."""
        ordered = sorted(self.values)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1]


def excess(ours: Samples, theirs: Samples) -> float:
    """How much longer ours took than theirs, median against median (seconds)."""
    return ours.median - theirs.median


def versus(ours: Samples, theirs: Samples) -> str:
    """`ours ms vs bare theirs ms (+difference ms)`, of the medians."""
    return (
        f"{ours.median * 1000:.0f} ms vs bare {theirs.median * 1000:.0f} ms "
        f"({excess(ours, theirs) * 1000:+.0f} ms)"
    )


def run_ratios(ours: Samples, theirs: Samples) -> Samples:
    """Ours over theirs, run by run. The two sides of a run go back to back, so a machine
    that slows down or speeds up between runs (other tenants, a load average decaying after
    the bigger sizes) moves both alike; a ratio of two medians would mix runs that saw
    different machines."""
    # Not strict: a qlink side that failed stops, the bare side still gives its figures.
    pairs = zip(ours.values, theirs.values, strict=False)
    return Samples([mine / other for mine, other in pairs])


@dataclass
class BringupPoint:
    """One lab size and workload: `qlinkctl up` against the bare launcher, run after run."""

    nodes: int
    workload: str = "paused"
    qlink: Samples = field(default_factory=Samples)
    """`qlinkctl up FILE` until it returns (it answers once every node runs)."""
    qlink_with_status: Samples = field(default_factory=Samples)
    """`qlinkctl up`, then `qlinkctl status -o json` (which checks every node runs)."""
    bare: Samples = field(default_factory=Samples)
    """The in-process launcher: spawn every argv, until every QMP greeting."""
    bare_answered: Samples = field(default_factory=Samples)
    """The same launcher, until every QEMU answered its first command (`bench.bare`)."""
    qlink_ready: Samples = field(default_factory=Samples)
    """From the start of `up` until qlinkd reported every node ready (booting only)."""
    qlink_console_ready: Samples = field(default_factory=Samples)
    """From the start of `up` until every console log showed its ready line."""
    bare_ready: Samples = field(default_factory=Samples)
    """From the start of the launch until every console log showed its ready line."""
    down: Samples = field(default_factory=Samples)
    loads: list[float] = field(default_factory=list)
    first_launch: float | None = None
    """The untimed launch of the same VMs by the bare launcher before the timed runs."""

    @property
    def ratios(self) -> Samples:
        return run_ratios(self.qlink, self.bare)

    @property
    def ratio(self) -> float:
        return self.ratios.median

    @property
    def answered_ratios(self) -> Samples:
        return run_ratios(self.qlink, self.bare_answered)

    @property
    def ready_ratios(self) -> Samples:
        return run_ratios(self.qlink_ready, self.bare_ready)


@dataclass
class StormResult:
    """The control plane while N guests boot: each run starts the storm anew."""

    nodes: int
    status: Samples = field(default_factory=Samples)
    qlink_restart: Samples = field(default_factory=Samples)
    bare_restart: Samples = field(default_factory=Samples)
    loads: list[float] = field(default_factory=list)


@dataclass
class RestartResult:
    nodes: int
    qlink: Samples = field(default_factory=Samples)
    """`qlinkctl restart --force NODE`, the whole command."""
    api: Samples = field(default_factory=Samples)
    """The same restart asked on the control socket from the benchmark: the daemon's share."""
    bare: Samples = field(default_factory=Samples)
    bare_answered: Samples = field(default_factory=Samples)
    """The bare relaunch until the new QEMU answered its first command."""
    loads: list[float] = field(default_factory=list)


@dataclass
class IdleFigures:
    """qlinkd with a lab of idle VMs, under one `--liveness-interval`."""

    liveness_interval: float
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    cpu_seconds: float = 0.0
    window_seconds: float = 0.0
    load: float = 0.0

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_seconds / self.window_seconds


@dataclass
class IdleResult:
    nodes: int
    default: IdleFigures | None = None
    status: Samples = field(default_factory=Samples)
    status_get: Samples = field(default_factory=Samples)
    """GET /v1/status on the control socket from the benchmark: the daemon's share."""
    quiet: IdleFigures | None = None
    """The same VMs re-adopted by a qlinkd whose liveness probe is effectively off."""
    adopt_seconds: float | None = None
    note: str | None = None


@dataclass
class Machine:
    cores: int
    memory_gib: float
    qemu: str
    kernel: str
    python: str
    date: str
    load_at_start: tuple[float, float, float]
    commit: str


@dataclass
class Results:
    machine: Machine
    mode: str
    daemon_args: tuple[str, ...] = ()
    bringup: list[BringupPoint] = field(default_factory=list)
    restart: RestartResult | None = None
    idle: IdleResult | None = None
    storm: StormResult | None = None
    timelines: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)
    """Per `up` kind (e.g. "booting N=20"): (step, median, slowest VM) in seconds after `up`."""
    status_empty: Samples = field(default_factory=Samples)
    """`qlinkctl status -o json` with no lab up: the command's fixed cost."""
    interpreter: Samples = field(default_factory=Samples)
    """`python -c pass`: the interpreter's own start-up on this machine."""
    errors: dict[str, str] = field(default_factory=dict)
    """Section name → why it did not complete."""
    total_seconds: float = 0.0


# --- targets (issue 16), in the order and words of its table --------------------------------

UP_RATIO = 1.15
READY_RATIO = 1.05
STATUS_P95 = 0.100
STORM_RESTART_MARGIN = 0.100
RESTART_MARGIN = 0.030
IDLE_RSS_BYTES = 100 * 1000 * 1000
IDLE_CPU_PERCENT = 1.0
DOWN_SECONDS = 1.0
PAUSED_SIZES = (20, 50, 100, 200)
BOOTING_SIZES = (20, 50, 100)
READY_SIZES = (20, 50)


@dataclass(frozen=True, slots=True)
class Verdict:
    figure: str
    target: str
    measured: str
    met: bool | None
    """None: not measured in this run."""
    missing: str = ""
    """The part of the figure this run did not measure (a reduced run), if any."""

    @property
    def word(self) -> str:
        word = {True: "met", False: "not met", None: "not measured"}[self.met]
        return (
            f"{word} ({self.missing} not measured)"
            if self.missing and self.met is not None
            else word
        )


def _per_size(
    points: dict[int, Samples], sizes: tuple[int, ...], limit: float, unit: str
) -> tuple[str, bool | None, str]:
    measured = {n: points[n] for n in sizes if points.get(n)}
    text = ", ".join(f"N={n}: {samples.median:.2f}{unit}" for n, samples in measured.items())
    missing = ", ".join(f"N={n}" for n in sizes if n not in measured)
    if not measured:
        return "-", None, missing
    return text, all(s.median <= limit for s in measured.values()), missing


def _ratio_verdicts(results: Results) -> list[Verdict]:
    paused = {p.nodes: p.ratios for p in results.bringup if p.workload == "paused"}
    booting = {p.nodes: p.ratios for p in results.bringup if p.workload == "booting"}
    ready = {p.nodes: p.ready_ratios for p in results.bringup if p.workload == "booting"}
    found = []
    for figure, points, sizes, limit in (
        ("`up` / bare, paused guests, N = 20, 50, 100, 200", paused, PAUSED_SIZES, UP_RATIO),
        ("`up` / bare, booting guests, N = 20, 50, 100", booting, BOOTING_SIZES, UP_RATIO),
        ("every guest ready, qlink / bare, N = 20, 50", ready, READY_SIZES, READY_RATIO),
    ):
        measured, met, missing = _per_size(points, sizes, limit, "x")
        found.append(Verdict(figure, f"≤ {limit:.2f}x", measured, met, missing))
    return found


def _storm_verdicts(results: Results) -> list[Verdict]:
    storm = results.storm
    status, restart = "-", "-"
    status_met: bool | None = None
    restart_met: bool | None = None
    if storm is not None and storm.status:
        p95 = storm.status.percentile(0.95)
        status, status_met = f"{p95 * 1000:.0f} ms", p95 <= STATUS_P95
    if storm is not None and storm.qlink_restart and storm.bare_restart:
        restart = versus(storm.qlink_restart, storm.bare_restart)
        restart_met = excess(storm.qlink_restart, storm.bare_restart) <= STORM_RESTART_MARGIN
    return [
        Verdict("`status -o json` p95 while 20 guests boot", "≤ 100 ms", status, status_met),
        Verdict("`restart NODE` while 20 guests boot", "≤ bare + 100 ms", restart, restart_met),
    ]


def _idle_verdict(results: Results) -> Verdict:
    figure = "200 idle VMs: qlinkd RSS, CPU"
    target = "as today (≤ 100 MB, ≤ 1%)"
    idle = results.idle
    if idle is None or idle.default is None:
        return Verdict(figure, target, "-", None)
    rss, cpu = idle.default.rss_bytes, idle.default.cpu_percent
    measured = f"{rss / 1e6:.1f} MB, {cpu:.2f}%" + (
        f" ({idle.nodes} VMs)" if idle.nodes != 200 else ""
    )
    missing = "N=200" if idle.nodes != 200 else ""
    met = rss <= IDLE_RSS_BYTES and cpu <= IDLE_CPU_PERCENT
    return Verdict(figure, target, measured, met, missing)


def _down_verdict(results: Results) -> Verdict:
    figure, target = "`down` of 20 paused VMs", "≤ 1 s (today 30.1 s)"
    point = next(
        (p for p in results.bringup if p.workload == "paused" and p.nodes == 20 and p.down), None
    )
    if point is None:
        return Verdict(figure, target, "-", None)
    return Verdict(
        figure, target, f"{point.down.median:.2f} s ({point.down.low:.2f}-{point.down.high:.2f})",
        point.down.median <= DOWN_SECONDS,
    )  # fmt: skip


def _restart_verdict(results: Results) -> Verdict:
    figure = f"`restart --force NODE`, {PAUSED_SIZES[0] - 1} peers up"
    target = "≤ bare + 30 ms (today +64 ms)"
    restart = results.restart
    if restart is None or not (restart.qlink and restart.bare):
        return Verdict(figure, target, "-", None)
    met = excess(restart.qlink, restart.bare) <= RESTART_MARGIN
    return Verdict(figure, target, versus(restart.qlink, restart.bare), met)


def verdicts(results: Results) -> list[Verdict]:
    return [
        *_ratio_verdicts(results),
        *_storm_verdicts(results),
        _idle_verdict(results),
        _down_verdict(results),
        _restart_verdict(results),
    ]
