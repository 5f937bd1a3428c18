"""What a benchmark run measured, as plain data, and the targets it is judged against."""

from __future__ import annotations

import itertools
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


@dataclass
class BringupPoint:
    """One lab size: qlink (up + status) against the bare launcher, run after run."""

    nodes: int
    qlink: Samples = field(default_factory=Samples)
    qlink_up_only: Samples = field(default_factory=Samples)
    bare: Samples = field(default_factory=Samples)
    bare_in_script: Samples = field(default_factory=Samples)
    down: Samples = field(default_factory=Samples)
    loads: list[float] = field(default_factory=list)
    first_launch: float | None = None
    """The untimed launch of the same VMs by the bare launcher before the timed runs."""

    @property
    def ratios(self) -> Samples:
        """qlink over bare, run by run. The two sides of a run go back to back, so a machine
        that slows down or speeds up between runs (other tenants, a load average decaying after
        the bigger sizes) moves both alike; a ratio of two medians would mix runs that saw
        different machines."""
        # Not strict: a qlink side that failed stops, the bare side still gives its figures.
        pairs = zip(self.qlink.values, self.bare.values, strict=False)
        return Samples([qlink / bare for qlink, bare in pairs])

    @property
    def ratio(self) -> float:
        return self.ratios.median


@dataclass
class RestartResult:
    nodes: int
    qlink: Samples = field(default_factory=Samples)
    bare: Samples = field(default_factory=Samples)
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
class GuestResult:
    nodes: int
    qlink_ready: Samples = field(default_factory=Samples)
    qlink_up_only: Samples = field(default_factory=Samples)
    bare_ready: Samples = field(default_factory=Samples)
    loads: list[float] = field(default_factory=list)


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
    bringup: list[BringupPoint] = field(default_factory=list)
    restart: RestartResult | None = None
    idle: IdleResult | None = None
    guest: GuestResult | None = None
    guest_skipped: str | None = None
    status_empty: Samples = field(default_factory=Samples)
    """`qlinkctl status -o json` with no lab up: the command's fixed cost."""
    interpreter: Samples = field(default_factory=Samples)
    """`python -c pass`: the interpreter's own start-up on this machine."""
    errors: dict[str, str] = field(default_factory=dict)
    """Section name → why it did not complete."""
    total_seconds: float = 0.0


# --- targets -------------------------------------------------------------------------------

BRINGUP_RATIO = 1.25
RESTART_MARGIN = 0.100
IDLE_RSS_BYTES = 100 * 1000 * 1000
IDLE_CPU_PERCENT = 1.0
STATUS_P95 = 0.100
# "Growing linearly": the cost per added VM over the last step of sizes is at most this many
# times the cost per added VM over the first step (a quadratic term shows up as a rising slope).
LINEAR_SLOPE_GROWTH = 1.5


@dataclass(frozen=True, slots=True)
class Verdict:
    target: str
    measured: str
    passed: bool | None
    """None: not measurable in this run (too few sizes, or the section failed)."""

    @property
    def word(self) -> str:
        return {True: "pass", False: "MISS", None: "n/a"}[self.passed]


def slopes(points: list[BringupPoint]) -> list[float]:
    """Seconds per added VM between consecutive sizes (qlink medians)."""
    return [
        (b.qlink.median - a.qlink.median) / (b.nodes - a.nodes)
        for a, b in itertools.pairwise(points)
    ]


def verdicts(results: Results) -> list[Verdict]:
    found: list[Verdict] = []
    complete = [p for p in results.bringup if p.qlink and p.bare]
    for point in complete:
        found.append(
            Verdict(
                f"bring-up N={point.nodes}: qlink ≤ {BRINGUP_RATIO}x bare",
                f"{point.ratio:.2f}x",
                point.ratio <= BRINGUP_RATIO,
            )
        )
    steps = slopes(complete)
    if len(steps) >= 2:
        growth = steps[-1] / steps[0] if steps[0] > 0 else math.inf
        found.append(
            Verdict(
                f"bring-up grows linearly (last slope ≤ {LINEAR_SLOPE_GROWTH}x first)",
                "slopes " + ", ".join(f"{s * 1000:.0f}" for s in steps) + f" ms/VM ({growth:.2f}x)",
                growth <= LINEAR_SLOPE_GROWTH,
            )
        )
    else:
        found.append(Verdict("bring-up grows linearly", "needs 3 sizes or more", None))
    restart = results.restart
    if restart and restart.qlink and restart.bare:
        excess = restart.qlink.median - restart.bare.median
        found.append(
            Verdict(
                f"restart: qlink ≤ bare + {RESTART_MARGIN * 1000:.0f} ms",
                f"{restart.qlink.median * 1000:.0f} ms vs {restart.bare.median * 1000:.0f} ms "
                f"({excess * 1000:+.0f} ms)",
                excess <= RESTART_MARGIN,
            )
        )
    idle = results.idle
    if idle and idle.default:
        figures = idle.default
        found.append(
            Verdict(
                f"{idle.nodes} idle VMs: qlinkd RSS ≤ {IDLE_RSS_BYTES / 1e6:.0f} MB",
                f"{figures.rss_bytes / 1e6:.1f} MB",
                figures.rss_bytes <= IDLE_RSS_BYTES,
            )
        )
        found.append(
            Verdict(
                f"{idle.nodes} idle VMs: qlinkd CPU ≤ {IDLE_CPU_PERCENT:g}% of one core",
                f"{figures.cpu_percent:.2f}%",
                figures.cpu_percent <= IDLE_CPU_PERCENT,
            )
        )
    if idle and idle.status:
        p95 = idle.status.percentile(0.95)
        found.append(
            Verdict(
                f"{idle.nodes} idle VMs: `qlinkctl status -o json` p95 ≤ "
                f"{STATUS_P95 * 1000:.0f} ms",
                f"{p95 * 1000:.0f} ms",
                p95 <= STATUS_P95,
            )
        )
    return found
