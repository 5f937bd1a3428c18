"""`python -m bench`: qlink against the physical limit, written to BENCHMARKS.md.

    python -m bench                 # the full run (paused N = 20, 50, 100, 200; booting
                                    # N = 20, 50, 100, ready at 20, 50; a 20-guest boot storm)
    python -m bench --quick         # laptop-sized (paused N = 4, 8; booting N = 4)
    python -m bench --sizes 20 --boot-sizes 20 --ready-sizes 20 --runs 7   # a reduced run

Exit status: 0 when every measurement completed (whether or not it met its target), 1 when
one failed (the report says which), 130 on Ctrl-C (after tearing everything down).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.procs import sweep_sync
from bench.report import write_report
from bench.results import Machine, Results, verdicts
from bench.runner import REPO, Settings, progress, run_bench

GUEST_KERNEL = Path(os.environ.get("QLINK_GUEST_DIR", "/var/cache/qlink/guest")) / "vmlinuz"


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except OSError as error:
        return f"unknown ({error})"
    return done.stdout.strip()


def _first_line(argv: list[str]) -> str:
    return (_output(argv).splitlines() or ["unknown"])[0]


def describe_machine() -> Machine:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    load = os.getloadavg()
    return Machine(
        cores=os.cpu_count() or 0,
        memory_gib=total_kib / 1024 / 1024,
        qemu=_first_line(["qemu-system-x86_64", "--version"]),
        kernel=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        load_at_start=(load[0], load[1], load[2]),
        commit=commit + (" with local changes" if dirty else ""),
    )


def _sizes(text: str) -> tuple[int, ...]:
    if not text:
        return ()  # none of that kind
    try:
        sizes = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r}") from None
    if any(size < 2 for size in sizes):
        raise argparse.ArgumentTypeError("a lab has at least 2 VMs (a spine and a leaf)")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the laptop-sized run")
    parser.add_argument(
        "--output", type=Path, help="the report (BENCHMARKS.md; --quick: bench/quick-report.md)"
    )
    parser.add_argument(
        "--plot", type=Path, help="the plot (bench/bringup.png; --quick: bench/quick-bringup.png)"
    )
    parser.add_argument("--runs", type=int, help="runs per bring-up size")
    parser.add_argument(
        "--sizes", type=_sizes, metavar="N,N...", help="the paused bring-up lab sizes"
    )
    parser.add_argument(
        "--boot-sizes", type=_sizes, metavar="N,N...", help="the booting bring-up lab sizes"
    )
    parser.add_argument(
        "--ready-sizes",
        type=_sizes,
        metavar="N,N...",
        help="the booting sizes also timed until every guest is ready",
    )
    parser.add_argument("--storm-runs", type=int, help="runs of the boot-storm figures")
    parser.add_argument(
        "--qlinkd-arg", action="append", default=[], metavar="ARG",
        help="pass ARG to qlinkd (repeatable; e.g. --qlinkd-arg=--vm-nice=0 to compare)",
    )  # fmt: skip
    parser.add_argument("--idle-nodes", type=int, help="the idle lab's size (one of --sizes)")
    parser.add_argument("--cpu-window", type=float, metavar="SECONDS", help="idle CPU window")
    parser.add_argument("--port-base", type=int, help="first UDP port of the generated labs")
    parser.add_argument("--keep-root", action="store_true", help="keep the root (logs) at the end")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.quick(GUEST_KERNEL) if args.quick else Settings.full(GUEST_KERNEL)
    given = {
        "runs": args.runs, "sizes": args.sizes, "boot_sizes": args.boot_sizes,
        "ready_sizes": args.ready_sizes, "storm_runs": args.storm_runs,
        "idle_nodes": args.idle_nodes, "cpu_window": args.cpu_window,
        "port_base": args.port_base, "daemon_args": tuple(args.qlinkd_arg) or None,
    }  # fmt: skip
    changes = {key: value for key, value in given.items() if value is not None}
    return dataclasses.replace(settings, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if not settings.kernel.is_file():
        print(f"bench: no kernel at {settings.kernel} (run guest/build-guest)", file=sys.stderr)
        return 2
    # A quick run must not overwrite the full run's report: it has its own default files.
    default_output, default_plot = (
        (REPO / "bench" / "quick-report.md", REPO / "bench" / "quick-bringup.png")
        if args.quick
        else (REPO / "BENCHMARKS.md", REPO / "bench" / "bringup.png")
    )
    output, plot = args.output or default_output, args.plot or default_plot
    results = Results(
        machine=describe_machine(), mode=settings.mode, daemon_args=settings.daemon_args
    )
    progress(f"{settings.mode} run, load {results.machine.load_at_start[0]:.2f}")
    # Short: unix socket paths under it must stay within 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="qlb-", dir="/tmp"))  # the run's roots go in here
    # An installed qlink has its bytecode; an editable one writes it on first use, unless the
    # caller's environment says PYTHONDONTWRITEBYTECODE, which would make every qlinkctl,
    # qlinkd and bare launcher the run starts compile their modules again (~20 ms a command).
    # The commands get a bytecode cache of the run's own instead.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    interrupted = False
    try:
        asyncio.run(run_bench(settings, results, root))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # The run tears down after itself; this catches what an interrupted teardown left.
        if swept := sweep_sync(root):
            progress(f"swept QEMU left under {root}: {swept}")
        if not args.keep_root:
            shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        return 130
    write_report(results, output, plot)
    progress(f"report: {output}, plot: {plot}")
    for verdict in verdicts(results):
        print(f"{verdict.figure} ({verdict.target}): {verdict.measured}: {verdict.word}")
    for name, message in results.errors.items():
        print(f"FAILED {name}: {message.splitlines()[0] if message else ''}")
    return 1 if results.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
