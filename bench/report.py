"""The report: BENCHMARKS.md (a table per measurement) and the bring-up plot (Agg, no display)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.frr import kept_section
from bench.results import (
    READY_RATIO,
    RESTART_MARGIN,
    STATUS_P95,
    STORM_RESTART_MARGIN,
    UP_RATIO,
    BringupPoint,
    IdleFigures,
    Results,
    Samples,
    excess,
    verdicts,
    versus,
)

SECTIONS = (
    "## Machine",
    "## Targets",
    "## 1. Bring-up",
    "## 2. Where qlink's time goes",
    "## 3. Restart",
    "## 4. Daemon cost",
    "## 5. Boot storm",
    "## Method",
)


def seconds(samples: Samples, unit: str = "s") -> str:
    """`median (min-max)` in seconds or milliseconds."""
    if not samples:
        return "-"
    scale, digits = (1000.0, 0) if unit == "ms" else (1.0, 2)
    return (
        f"{samples.median * scale:.{digits}f} {unit} "
        f"({samples.low * scale:.{digits}f}-{samples.high * scale:.{digits}f})"
    )


def _ratio(ratios: Samples) -> str:
    return f"{ratios.median:.2f}x ({ratios.low:.2f}-{ratios.high:.2f})"


def loads(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _failed(results: Results, prefix: str) -> list[str]:
    return [
        f"**Did not complete** ({name}): `{message.splitlines()[0] if message else ''}`"
        for name, message in results.errors.items()
        if name.startswith(prefix)
    ]


def machine_section(results: Results) -> list[str]:
    machine = results.machine
    load = ", ".join(f"{value:.2f}" for value in machine.load_at_start)
    rows = [
        ["date (UTC)", machine.date],
        ["mode", f"`python -m bench{' --quick' if results.mode == 'quick' else ''}`"],
        ["cores", str(machine.cores)],
        ["memory", f"{machine.memory_gib:.1f} GiB"],
        ["QEMU", machine.qemu],
        ["kernel", machine.kernel],
        ["Python", machine.python],
        ["qlink commit", machine.commit],
        ["qlinkd arguments", " ".join(["--log-format json", *results.daemon_args])],
        ["sizes measured", _sizes_measured(results)],
        ["load average at start (1, 5, 15 min)", load],
        ["total run time", f"{results.total_seconds / 60:.1f} min"],
    ]
    if results.interpreter:
        rows.append(["`python -c pass` (interpreter start-up)", seconds(results.interpreter, "ms")])
    if results.status_empty:
        rows.append(["`qlinkctl status -o json`, no lab up", seconds(results.status_empty, "ms")])
    return ["## Machine", "", *_table(["", ""], rows)]


def _sizes_measured(results: Results) -> str:
    def listed(sizes: list[int]) -> str:
        return ", ".join(str(n) for n in sizes) or "none"

    paused = [p.nodes for p in results.bringup if p.workload == "paused" and p.qlink]
    booting = [p.nodes for p in results.bringup if p.workload == "booting" and p.qlink]
    ready = [p.nodes for p in results.bringup if p.bare_ready]
    return (
        f"paused N = {listed(paused)}; booting N = {listed(booting)}; until every guest is "
        f"ready N = {listed(ready)}"
    )


def targets_section(results: Results) -> list[str]:
    rows = [[v.figure, v.target, v.measured, v.word] for v in verdicts(results)]
    return [
        "## Targets",
        "",
        "As issue 16 sets them: median of the runs (ratios taken run by run, then their "
        "median). A figure whose sizes were not all measured in this run says which are "
        "missing.",
        "",
        *_table(["figure", "target", "measured", "met"], rows),
        *_answered_lines(results),
    ]


def _answered_lines(results: Results) -> list[str]:
    """The same figures against a launcher that waits until QEMU answered a command."""
    rows = [
        [f"`up` / bare until answered, {p.workload} guests, N = {p.nodes}",
         _ratio(p.answered_ratios)]
        for p in results.bringup
        if p.qlink and p.bare_answered
    ]  # fmt: skip
    restart = results.restart
    if restart is not None and restart.qlink and restart.bare_answered:
        rows.append(
            [f"`restart --force NODE`, {restart.nodes - 1} peers up, against the bare relaunch "
             "until answered", versus(restart.qlink, restart.bare_answered)]
        )  # fmt: skip
    if not rows:
        return []
    return [
        "The bare launcher the issue sets stops at each QMP greeting. QEMU 7.2 sends the "
        "greeting from its monitor's I/O thread as soon as a client connects, while its main "
        "thread is still building the machine: a QEMU whose `-device` names no netdev greets "
        "and then exits (the greeting launcher counted one as up 20 times out of 20; "
        "`tests/qemu/test_bench_bare.py`). The earliest moment a launcher can know QEMU "
        "started is its answer to a first command (`qmp_capabilities`, run by the main loop), "
        "which is what qlink waits for before a node counts as running. The same launcher, "
        "waiting for that answer, in the same runs (a third side, in alternating order):",
        "",
        *_table(["figure", "measured"], rows),
    ]


def _verdict(met: bool) -> str:
    return "met" if met else "not met"


def _bringup_row(point: BringupPoint) -> list[str]:
    both = bool(point.qlink and point.bare)
    answered = bool(point.qlink and point.bare_answered)
    return [
        str(point.nodes),
        seconds(point.qlink),
        seconds(point.bare),
        _ratio(point.ratios) if both else "-",
        _verdict(point.ratio <= UP_RATIO) if both else "-",
        seconds(point.bare_answered),
        _ratio(point.answered_ratios) if answered else "-",
        seconds(point.qlink_with_status),
        seconds(point.down),
        f"{point.first_launch:.2f} s" if point.first_launch is not None else "-",
        loads(point.loads),
    ]


def _ready_row(point: BringupPoint) -> list[str]:
    both = bool(point.qlink_ready and point.bare_ready)
    return [
        str(point.nodes),
        seconds(point.qlink_ready),
        seconds(point.qlink_console_ready),
        seconds(point.bare_ready),
        _ratio(point.ready_ratios) if both else "-",
        _verdict(point.ready_ratios.median <= READY_RATIO) if both else "-",
        loads(point.loads),
    ]


def bringup_section(results: Results, plot: Path, output: Path) -> list[str]:
    runs = max((len(p.qlink.values) for p in results.bringup), default=0)
    lines = [
        "## 1. Bring-up",
        "",
        "N VMs, 4 UDP links each, TCG. Paused: stopped by `-S` before their first "
        "instruction (no guest competes for the CPU). Booting: the test guest boots (256 MiB, "
        "kernel + initrd). qlink starts each QEMU with its CPUs stopped and runs them once "
        "the QEMUs starting beside it have started (its start hold); the bare launcher runs "
        "the argv without that `-S`, so each guest boots as soon as its QEMU has started, "
        "while the later QEMUs start. "
        "qlink: from starting `qlinkctl up FILE` until it returns (it answers once every node "
        "runs). Bare: the same argv (`qlinkctl plan FILE -o json`), spawned at once by a "
        "launcher inside the benchmark's own process (imports done, event loop running "
        "before the clock starts), until every QMP greeting; and the same launcher until "
        "every QEMU answered its first command (see Targets). Median (min-max) of "
        f"{runs} runs; the ratio is taken run by run (the sides of a run go back to back, "
        "in alternating order), then its median.",
        "",
    ]
    headers = [
        "N", "`qlinkctl up`", "bare launcher", "ratio", f"≤ {UP_RATIO}x",
        "bare, until answered", "ratio to it", "`up` + `status -o json`", "`qlinkctl down`",
        "first launch (bare, untimed)", "load (1 min)",
    ]  # fmt: skip
    for workload in ("paused", "booting"):
        points = [p for p in results.bringup if p.workload == workload]
        if points:
            lines += [f"### {workload.capitalize()} guests", ""]
            lines += _table(headers, [_bringup_row(point) for point in points])
    ready = [p for p in results.bringup if p.workload == "booting" and p.bare_ready]
    if ready:
        lines += [
            "### Booting guests: until every guest is ready",
            "",
            "From the start of the command (qlink: `qlinkctl up`; bare: the launch) until every "
            "guest printed `qlink-ready name=NODE` on its serial console. qlink: until qlinkd "
            "reported every node ready (its `vm_ready` events; the nodes' `ready: {console: "
            "...}`), and, as a check of that report in the first run only, until every console "
            "log showed the line (read by the benchmark, it would take CPU from the guests in "
            "every run, as qlinkd reads the logs too). Bare: "
            "until every console log showed the line (`-chardev ...,logfile=`, read as it "
            "grows). Same runs as the table above.",
            "",
        ]
        lines += _table(
            ["N", "qlink: ready (qlinkd)", "qlink: ready (console logs, first run)", "bare: ready",
             "ratio", f"≤ {READY_RATIO}x", "load (1 min)"],
            [_ready_row(point) for point in ready],
        )  # fmt: skip
    lines += _failed(results, "bring-up") + _failed(results, "warm-up")
    lines += [f"![bring-up time against N]({os.path.relpath(plot, output.parent)})", ""]
    return lines


def timeline_section(results: Results) -> list[str]:
    lines = [
        "## 2. Where qlink's time goes",
        "",
        "qlinkd's own timeline of each `up` (structured log fields: `up_timeline`, "
        "`vm_launch_timeline`, `qemu_spawned`; `python -m bench.timeline LOG --lab NAME`): "
        "for each step, ms after qlinkd began the `up`, for the median VM and the slowest, "
        "as the median over the runs. What the command adds outside qlinkd (its interpreter "
        "and the request) is the difference to the `qlinkctl up` figure above.",
        "",
    ]
    if not results.timelines:
        return [*lines, "No timeline was recorded.", ""]
    for kind, steps in sorted(results.timelines.items()):
        lines += [f"### {kind}", ""]
        lines += _table(
            ["step", "median VM", "slowest VM"],
            [[name, f"{median * 1000:.0f} ms", f"{slowest * 1000:.0f} ms"]
             for name, median, slowest in steps],
        )  # fmt: skip
    return lines


def restart_section(results: Results) -> list[str]:
    lines = ["## 3. Restart", ""]
    restart = results.restart
    if restart is None:
        return [*lines, "Not run.", ""]
    lines += [
        f"One node of a {restart.nodes}-VM paused lab ({restart.nodes - 1} peers up). qlink: "
        "wall time of `qlinkctl restart --force NODE` (it returns once the new QEMU answers "
        "QMP); its daemon's share is the same restart asked on the control socket from the "
        "benchmark's process (POST /v1/nodes/LAB/NODE/restart?force=1). Bare: in-process "
        "SIGKILL of the old PID, wait for its exit, relaunch of the same argv, until the QMP "
        "greeting, and (a second relaunch) until QEMU answered its first command. Median "
        f"(min-max) of {len(restart.qlink.values)} runs.",
        "",
    ]
    both = bool(restart.qlink and restart.bare)
    difference = excess(restart.qlink, restart.bare) if both else 0.0
    lines += _table(
        ["N", "`qlinkctl restart --force`", "the same, on the control socket",
         "bare kill + relaunch", "difference", f"≤ +{RESTART_MARGIN * 1000:.0f} ms",
         "bare, until answered", "load (1 min)"],
        [[str(restart.nodes), seconds(restart.qlink, "ms"), seconds(restart.api, "ms"),
          seconds(restart.bare, "ms"), f"{difference * 1000:+.0f} ms" if both else "-",
          _verdict(difference <= RESTART_MARGIN) if both else "-",
          seconds(restart.bare_answered, "ms"), loads(restart.loads)]],
    )  # fmt: skip
    return lines + _failed(results, "restart")


def _idle_column(figures: IdleFigures | None, what: str) -> str:
    if figures is None:
        return "-"
    return {
        "rss": f"{figures.rss_bytes / 1e6:.1f} MB",
        "peak": f"{figures.peak_rss_bytes / 1e6:.1f} MB",
        "cpu": f"{figures.cpu_percent:.2f}% ({figures.cpu_seconds:.2f} s CPU "
        f"in {figures.window_seconds:.0f} s)",
        "load": f"{figures.load:.1f}",
    }[what]


def _percentiles(label: str, samples: Samples) -> list[str]:
    if not samples:
        return [label, "-", "-", "-", ""]
    return [
        label,
        f"{samples.median * 1000:.0f} ms",
        f"{samples.percentile(0.95) * 1000:.0f} ms",
        f"{samples.low * 1000:.0f}-{samples.high * 1000:.0f} ms",
        "",
    ]


def idle_section(results: Results) -> list[str]:
    lines = ["## 4. Daemon cost", ""]
    idle = results.idle
    if idle is None:
        return [*lines, "Not run.", ""]
    lines += [
        f"qlinkd with {idle.nodes} idle (paused) VMs: RSS from /proc/PID/status, CPU as "
        "utime + stime from /proc/PID/stat over the window. The second column is the same VMs "
        f"re-adopted by a qlinkd started with `--liveness-interval 3600`: the difference is "
        "what the liveness probe (one `query-status` per VM per interval) costs.",
        "",
    ]
    if idle.note:
        lines += [f"Note: {idle.note}.", ""]
    default, quiet = idle.default, idle.quiet
    rows = [
        [label, _idle_column(default, key), _idle_column(quiet, key)]
        for label, key in (
            ("qlinkd RSS", "rss"),
            ("qlinkd peak RSS (VmHWM)", "peak"),
            ("qlinkd CPU, % of one core", "cpu"),
            ("load (1 min)", "load"),
        )
    ]
    if idle.adopt_seconds is not None:
        rows.append(["re-adoption of every VM after READY=1", "-", f"{idle.adopt_seconds:.2f} s"])
    lines += _table(
        ["", f"liveness {default.liveness_interval:g} s (default)" if default else "default",
         f"liveness {quiet.liveness_interval:g} s" if quiet else "liveness off: not measured"],
        rows,
    )  # fmt: skip
    if idle.status:
        p95 = idle.status.percentile(0.95)
        lines += [
            f"`qlinkctl status -o json` with {idle.nodes} VMs: wall time of the whole command, "
            f"{len(idle.status.values)} runs in a row, each followed by one GET /v1/status on "
            "the control socket from the benchmark itself (the daemon's share, without the "
            "interpreter start-up and imports every `qlinkctl` pays):",
            "",
            *_table(
                ["", "p50", "p95", "min-max", f"target p95 ≤ {STATUS_P95 * 1000:.0f} ms"],
                [["`qlinkctl status -o json`", f"{idle.status.median * 1000:.0f} ms",
                  f"{p95 * 1000:.0f} ms",
                  f"{idle.status.low * 1000:.0f}-{idle.status.high * 1000:.0f} ms",
                  _verdict(p95 <= STATUS_P95)],
                 _percentiles("GET /v1/status, in-process", idle.status_get),
                 _percentiles("`qlinkctl status -o json`, no lab up", results.status_empty),
                 _percentiles("`python -c pass`", results.interpreter)],
            ),
        ]  # fmt: skip
    return lines + _failed(results, "daemon cost")


def storm_section(results: Results) -> list[str]:
    lines = ["## 5. Boot storm", ""]
    storm = results.storm
    if storm is None:
        return [*lines, "Not run.", ""]
    lines += [
        f"The control plane while {storm.nodes} guests boot. Each run starts the booting lab "
        "anew (untimed) and, right after, while every guest boots: qlink: "
        "`qlinkctl status -o json` several times in a row, then `qlinkctl restart --force "
        "NODE` (a booting guest does not answer ACPI yet: a graceful restart would wait for "
        "the power-down timeout first); bare: in-process SIGKILL + relaunch of the same node. "
        f"{len(storm.qlink_restart.values)} runs, alternating which side goes first.",
        "",
    ]
    rows = []
    if storm.status:
        p95 = storm.status.percentile(0.95)
        rows.append(
            ["`qlinkctl status -o json`", f"p50 {storm.status.median * 1000:.0f} ms, "
             f"p95 {p95 * 1000:.0f} ms ({len(storm.status.values)} calls)",
             f"p95 ≤ {STATUS_P95 * 1000:.0f} ms", _verdict(p95 <= STATUS_P95)]
        )  # fmt: skip
    if storm.qlink_restart and storm.bare_restart:
        rows.append(
            ["`qlinkctl restart --force NODE`", seconds(storm.qlink_restart, "ms"),
             f"≤ bare + {STORM_RESTART_MARGIN * 1000:.0f} ms",
             _verdict(excess(storm.qlink_restart, storm.bare_restart) <= STORM_RESTART_MARGIN)]
        )  # fmt: skip
        rows.append(["bare kill + relaunch", seconds(storm.bare_restart, "ms"), "", ""])
    rows.append(["load (1 min)", loads(storm.loads), "", ""])
    lines += _table(["", "measured", "target", "met"], rows)
    return lines + _failed(results, "boot storm")


METHOD = """\
## Method

- `python -m bench` regenerates this file and the plot; `python -m bench --quick` is the
  laptop-sized run (paused N = 4, 8; booting N = 4 without the ready figure; 2 runs; a 4-VM
  restart and storm; 8-VM idle lab; 5 s CPU window). `--sizes`, `--boot-sizes`,
  `--ready-sizes`, `--runs`, `--storm-runs` give a reduced run. Both write where `--output`
  and `--plot` say.
- One qlinkd (`--log-format json`, its defaults otherwise: a paused VM skips the ACPI step of
  the stop ladder by itself), started on a short root under /tmp and awaited through
  NOTIFY_SOCKET, as systemd does. Booting labs go down with `--force`. Everything it starts
  is torn down at the end.
- qlink and the bare launcher use the same root, argv, paths and UDP ports, one after the
  other, never at once; the runs alternate which side goes first, after one untimed warm-up
  of each. The benchmark checks that qlinkd launched exactly the argv `qlinkctl plan` printed.
- Each size starts with one untimed launch of its VMs by the bare launcher ("first launch"
  in the bring-up table): the first launch of N VMs can run slower than the ones after it,
  whoever makes it, and it would fall on whichever side went first.
- The bare launcher is the physical limit: it runs in the benchmark's process, imports done.
  It is measured twice: until each QMP greeting (the limit the issue sets, which QEMU sends
  before it has built its machine) and until each QEMU answered its first command (the
  earliest proof that QEMU started, which qlink waits for).
  qlink's side is `qlinkctl`, as a user runs it, so it pays its interpreter's start-up and
  imports (see `python -c pass` and `qlinkctl status -o json`, no lab up, under Machine).
  Every command runs with Python's bytecode cache (in the run's root), as an installed
  package has it, whatever PYTHONDONTWRITEBYTECODE says in the caller's environment.
- The generated labs fix their UDP ports (28000 up, one block per size and workload) so that
  other labs on a shared machine cannot take them while a benchmark lab is down between runs.
- Load average is shown per measurement: other VMs on the machine slow both sides, and
  a loaded machine makes every figure here worse than on an idle one.
"""


def render(results: Results, plot: Path, output: Path) -> str:
    lines = [
        "# qlink benchmarks",
        "",
        "qlink against the physical limit (a bare launcher of the same QEMU argv), measured in "
        "the same run on the same machine. Generated by `python -m bench`; do not edit.",
        "",
        *machine_section(results),
        *targets_section(results),
        *bringup_section(results, plot, output),
        *timeline_section(results),
        *restart_section(results),
        *idle_section(results),
        *storm_section(results),
        *kept_section(output),  # the FRR lab's figures: `make bench-frr` writes them
    ]
    if results.errors:
        lines += ["## Errors", ""]
        lines += [
            f"- {name}: `{' '.join(message.split())[:500]}`"
            for name, message in results.errors.items()
        ]
        lines.append("")
    lines.append(METHOD)
    return "\n".join(lines)


def plot_bringup(results: Results, path: Path) -> None:
    """Bring-up time against N, median with min-max bars, for qlink and the bare launcher."""
    figure = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, workload, attribute, style in (
        ("qlink, paused", "paused", "qlink", "o-"),
        ("bare, paused", "paused", "bare", "s--"),
        ("qlink, booting", "booting", "qlink", "o-"),
        ("bare, booting", "booting", "bare", "s--"),
    ):
        points = [
            (p.nodes, getattr(p, attribute)) for p in results.bringup if p.workload == workload
        ]
        points = [(n, samples) for n, samples in points if samples]
        if not points:
            continue
        sizes = [n for n, _ in points]
        medians = [s.median for _, s in points]
        errors = [
            [s.median - s.low for _, s in points],
            [s.high - s.median for _, s in points],
        ]
        axes.errorbar(sizes, medians, yerr=errors, fmt=style, capsize=4, label=label)
    axes.set_xlabel("VMs in the lab (N), 4 UDP links each")
    axes.set_ylabel("seconds until every VM runs (qlink: `up` returns)")
    axes.set_title(f"Bring-up, {results.machine.cores} cores, {results.machine.date[:10]}")
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def write_report(results: Results, output: Path, plot: Path) -> None:
    plot_bringup(results, plot)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(results, plot, output), encoding="utf-8")
