"""The report: BENCHMARKS.md (a table per measurement) and the bring-up plot (Agg, no display)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.results import (
    BRINGUP_RATIO,
    RESTART_MARGIN,
    STATUS_P95,
    IdleFigures,
    Results,
    Samples,
    verdicts,
)

SECTIONS = (
    "## Machine",
    "## Targets",
    "## 1. Bring-up",
    "## 2. Restart",
    "## 3. Daemon cost",
    "## 4. Real guests",
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
        ["load average at start (1, 5, 15 min)", load],
        ["total run time", f"{results.total_seconds / 60:.1f} min"],
    ]
    if results.interpreter:
        rows.append(["`python -c pass` (interpreter start-up)", seconds(results.interpreter, "ms")])
    if results.status_empty:
        rows.append(["`qlinkctl status -o json`, no lab up", seconds(results.status_empty, "ms")])
    return ["## Machine", "", *_table(["", ""], rows)]


def targets_section(results: Results) -> list[str]:
    rows = [[v.target, v.measured, v.word] for v in verdicts(results)]
    return ["## Targets", "", *_table(["target", "measured", "verdict"], rows)]


def bringup_section(results: Results, plot: Path, output: Path) -> list[str]:
    lines = [
        "## 1. Bring-up",
        "",
        "N VMs paused by `-S` (TCG, the test guest's kernel loaded, never run), 4 UDP links "
        "each. qlink: from starting `qlinkctl up FILE` until `qlinkctl status -o json` lists "
        "every node running. Bare: the same argv (`qlinkctl plan FILE -o json`) started at once "
        "by `python -m bench.bare up`, until every QMP greeting. Median (min-max) of "
        f"{max((len(p.qlink.values) for p in results.bringup), default=0)} runs. The ratio is "
        "taken run by run (the two sides of a run go back to back, in alternating order), "
        "then its median.",
        "",
    ]
    rows = [
        [
            str(point.nodes),
            seconds(point.qlink),
            seconds(point.bare),
            _ratio(point.ratios) if point.qlink and point.bare else "-",
            ("pass" if point.ratio <= BRINGUP_RATIO else "MISS")
            if point.qlink and point.bare
            else "-",
            seconds(point.qlink_up_only),
            seconds(point.bare_in_script),
            seconds(point.down),
            f"{point.first_launch:.2f} s" if point.first_launch is not None else "-",
            loads(point.loads),
        ]
        for point in results.bringup
    ]
    headers = [
        "N", "qlink: up + status", "bare launcher", "ratio", f"≤ {BRINGUP_RATIO}x",
        "`qlinkctl up` alone", "bare, after its imports", "`qlinkctl down`",
        "first launch (bare, untimed)", "load (1 min)",
    ]  # fmt: skip
    lines += _table(headers, rows)
    lines += _failed(results, "bring-up") + _failed(results, "warm-up")
    lines += [f"![bring-up time against N]({os.path.relpath(plot, output.parent)})", ""]
    return lines


def restart_section(results: Results) -> list[str]:
    lines = ["## 2. Restart", ""]
    restart = results.restart
    if restart is None:
        return [*lines, "Not run.", ""]
    lines += [
        f"One node of a {restart.nodes}-VM lab. qlink: wall time of `qlinkctl restart --force "
        "NODE` (it returns once the new QEMU answers QMP). Bare: `python -m bench.bare restart`, "
        "SIGKILL of the old PID, wait for its exit, relaunch of the same argv, until the QMP "
        f"greeting. Median (min-max) of {len(restart.qlink.values)} runs.",
        "",
    ]
    excess = (
        f"{(restart.qlink.median - restart.bare.median) * 1000:+.0f} ms"
        if restart.qlink and restart.bare
        else "-"
    )
    lines += _table(
        ["N", "qlink restart --force", "bare kill + relaunch", "difference",
         f"target ≤ +{RESTART_MARGIN * 1000:.0f} ms", "load (1 min)"],
        [[str(restart.nodes), seconds(restart.qlink, "ms"), seconds(restart.bare, "ms"), excess,
          ("pass" if restart.qlink.median - restart.bare.median <= RESTART_MARGIN else "MISS")
          if restart.qlink and restart.bare else "-", loads(restart.loads)]],
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
    lines = ["## 3. Daemon cost", ""]
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
                  "pass" if p95 <= STATUS_P95 else "MISS"],
                 _percentiles("GET /v1/status, in-process", idle.status_get),
                 _percentiles("`qlinkctl status -o json`, no lab up", results.status_empty),
                 _percentiles("`python -c pass`", results.interpreter)],
            ),
        ]  # fmt: skip
    return lines + _failed(results, "daemon cost")


def guest_section(results: Results) -> list[str]:
    lines = ["## 4. Real guests", ""]
    guest = results.guest
    if guest is None:
        return [*lines, f"Not run: {results.guest_skipped or 'not requested'}.", ""]
    lines += [
        "`configs/clos.yaml` (2 spines, 4 leaves, the tiny test guest under TCG, 256 MiB each): "
        "from the start of the command until every node's console log shows its "
        "`qlink-ready name=NODE` line. qlink: `qlinkctl up configs/clos.yaml`; bare: the same "
        f"six argv by `python -m bench.bare up`. Median (min-max) of "
        f"{len(guest.qlink_ready.values)} runs.",
        "",
    ]
    ratio = (
        f"{guest.qlink_ready.median / guest.bare_ready.median:.2f}x"
        if guest.qlink_ready and guest.bare_ready
        else "-"
    )
    lines += _table(
        ["nodes", "qlink: up → all ready", "bare → all ready", "ratio", "`qlinkctl up` returns",
         "load (1 min)"],
        [[str(guest.nodes), seconds(guest.qlink_ready), seconds(guest.bare_ready), ratio,
          seconds(guest.qlink_up_only), loads(guest.loads)]],
    )  # fmt: skip
    return lines + _failed(results, "real guests")


METHOD = """\
## Method

- `python -m bench` regenerates this file and the plot; `python -m bench --quick` is the
  laptop-sized run (N = 4, 8; 2 runs; 8-VM restart and idle lab; 5 s CPU window; no guests
  unless `--guest`). Both write where `--output` and `--plot` say.
- One qlinkd (`--log-format json`, `--powerdown-timeout 0`: a paused VM ignores ACPI, so
  teardown goes straight to QMP `quit`), started on a short root under /tmp and awaited
  through NOTIFY_SOCKET, as systemd does. Everything it starts is torn down at the end.
- qlink and the bare launcher use the same root, argv, paths and UDP ports, one after the
  other, never at once; the runs alternate which side goes first, after one untimed warm-up
  of each. The benchmark checks that qlinkd launched exactly the argv `qlinkctl plan` printed.
- Each size starts with one untimed launch of its VMs by the bare launcher ("first launch"
  in the bring-up table): on this kind of machine the first launch of N VMs can run seconds
  slower than the ones after it, whoever makes it (compare that column with the bare
  launcher's median), and it would fall on whichever side went first.
- Both sides are commands started by the benchmark (`qlinkctl`, `python -m bench.bare`) and
  pay the interpreter's start-up: see `python -c pass` under Machine. qlink's bring-up runs
  two commands (`up`, then `status`), the bare launcher one. Every command runs with Python's
  bytecode cache (in the run's root), as an installed package has it, whatever
  PYTHONDONTWRITEBYTECODE says in the caller's environment.
- The generated labs fix their UDP ports (28000 up, one block per size) so that other labs
  on a shared machine cannot take them while a benchmark lab is down between runs.
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
        *restart_section(results),
        *idle_section(results),
        *guest_section(results),
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
    for label, attribute, style in (
        ("qlink (up + status)", "qlink", "o-"),
        ("bare launcher", "bare", "s--"),
    ):
        points = [(p.nodes, getattr(p, attribute)) for p in results.bringup]
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
    axes.set_xlabel("VMs in the lab (N), paused with -S, 4 UDP links each")
    axes.set_ylabel("seconds until every VM answers QMP")
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
