"""Where `up`'s time goes: the per-VM timeline qlinkd logs, read back from its JSON log.

qlinkd logs monotonic marks for each `up` (`up_timeline`: the host's ports scanned, the plan,
the port preflight, the starts submitted, every node answered, carrier settled) and for each
launch (`vm_launch_timeline`: starting, ports checked, files ready, launched, recorded,
running; `qemu_spawned`: spawn, QMP listening, greeting and capabilities done, released
from the start hold, CPUs running). This module
puts each VM's marks on the time axis of its `up` and summarises them: per step, the median
VM and the slowest one, in seconds after `up` began.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

# The per-VM steps in the order they happen, with their source event and mark.
VM_STEPS = (
    ("supervisor: STARTING", "vm_launch_timeline", "starting"),
    ("ports checked", "vm_launch_timeline", "ports_checked"),
    ("files ready", "vm_launch_timeline", "files_ready"),
    ("QEMU spawned", "qemu_spawned", "spawned"),
    ("QMP listening (console socket created)", "qemu_spawned", "listening"),
    ("QMP greeting + capabilities", "qemu_spawned", "qmp_ready"),
    ("released (every start beside it answered)", "qemu_spawned", "released"),
    ("CPUs running (`cont` answered)", "qemu_spawned", "cpus_running"),
    ("process record written", "vm_launch_timeline", "recorded"),
    ("RUNNING", "vm_launch_timeline", "running"),
)
UP_STEPS = (
    ("host ports scanned", "ports_scanned"),
    ("planned", "planned"),
    ("port preflight", "preflight"),
    ("starts submitted", "submitted"),
    ("every node answered", "all_answered"),
    ("carrier settled (reply)", "carrier_settled"),
)

Step = tuple[str, float, float]


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for line in handle:
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict) and isinstance(event.get("marks"), dict):
                    yield event


def _vm_offsets(events: list[dict[str, Any]], up: dict[str, Any]) -> dict[str, list[float]]:
    """Each VM step's offsets (seconds after `up`) for the VMs this `up` launched."""
    start, end = up["marks"]["up"], up["marks"]["carrier_settled"]
    lab = up.get("lab")
    offsets: dict[str, list[float]] = {name: [] for name, _, _ in VM_STEPS}
    launches = [
        e for e in events
        if e.get("event") == "vm_launch_timeline" and e.get("lab") == lab
        and start <= e["marks"].get("starting", -1) <= end
    ]  # fmt: skip
    spawns = {
        (e.get("node"), e["marks"]["launch"]): e["marks"]
        for e in events
        if e.get("event") == "qemu_spawned" and e.get("lab") == lab and "launch" in e["marks"]
    }
    for launch in launches:
        marks = dict(launch["marks"])
        first, last = marks["starting"], marks["running"]
        for (node, at), spawned in spawns.items():
            if node == launch.get("node") and first <= at <= last:
                marks.update(spawned)
        for name, _, mark in VM_STEPS:
            if mark in marks:
                offsets[name].append(marks[mark] - start)
    return offsets


def timeline_of(events: list[dict[str, Any]], up: dict[str, Any]) -> list[Step]:
    """One `up`: (step, median VM, slowest VM) in seconds after it began."""
    steps: list[Step] = []
    for name, values in _vm_offsets(events, up).items():
        if values:
            steps.append((name, statistics.median(values), max(values)))
    marks = up["marks"]
    for name, mark in UP_STEPS:
        if mark in marks:
            offset = marks[mark] - marks["up"]
            steps.append((f"`up`: {name}", offset, offset))
    return sorted(steps, key=lambda step: step[2])


def summarise(timelines: Iterable[list[Step]]) -> list[Step]:
    """The median of each step over several `up`s of the same kind."""
    collected: dict[str, tuple[list[float], list[float]]] = {}
    for timeline in timelines:
        for name, median, slowest in timeline:
            medians, slowests = collected.setdefault(name, ([], []))
            medians.append(median)
            slowests.append(slowest)
    steps = [
        (name, statistics.median(medians), statistics.median(slowests))
        for name, (medians, slowests) in collected.items()
    ]
    return sorted(steps, key=lambda step: step[2])


def lab_timelines(
    paths: Iterable[Path], lab: str, windows: Sequence[tuple[float, float]] | None = None
) -> list[list[Step]]:
    """Every `up` of `lab` in these qlinkd logs, each as its timeline; with `windows`
    (monotonic seconds, the clock qlinkd's marks use), only those begun within one."""
    timelines = []
    for path in paths:
        events = list(read_events(path))
        for up in events:
            ours = up.get("event") == "up_timeline" and up.get("lab") == lab
            if not ours or "carrier_settled" not in up["marks"]:
                continue
            began = up["marks"]["up"]
            if windows is None or any(start <= began <= end for start, end in windows):
                timelines.append(timeline_of(events, up))
    return timelines


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.timeline LOG LAB`: the summary of that lab's `up`s, for profiling."""
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__)
    parser.add_argument("log", type=Path, nargs="+")
    parser.add_argument("--lab", required=True)
    args = parser.parse_args(argv)
    timelines = lab_timelines(args.log, args.lab)
    print(f"{len(timelines)} `up`s of {args.lab}; ms after `up` began (median VM, slowest VM)")
    for name, median, slowest in summarise(timelines):
        print(f"{median * 1000:8.0f} {slowest * 1000:8.0f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
