"""The benchmark's timeline of `up` (bench/timeline.py), read from a qlinkd log: a lab that
other parts of the run bring up too (the boot storm) is timed on its bring-up runs alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.timeline import lab_timelines


def up_events(lab: str, at: float, spawn_after: float) -> list[dict[str, Any]]:
    """One `up` of one VM, as qlinkd logs it, begun at monotonic second `at`."""
    return [
        {"event": "vm_launch_timeline", "lab": lab, "node": "a",
         "marks": {"starting": at + 0.01, "launched": at + spawn_after + 0.1,
                   "running": at + spawn_after + 0.1}},
        {"event": "qemu_spawned", "lab": lab, "node": "a",
         "marks": {"launch": at + 0.02, "spawned": at + spawn_after,
                   "qmp_ready": at + spawn_after + 0.1}},
        {"event": "up_timeline", "lab": lab, "nodes": 1,
         "marks": {"up": at, "all_answered": at + spawn_after + 0.1,
                   "carrier_settled": at + spawn_after + 0.1}},
    ]  # fmt: skip


def test_only_the_ups_begun_within_the_windows_count(tmp_path: Path) -> None:
    log = tmp_path / "qlinkd.log"
    events = [*up_events("lab", 100.0, 0.2), *up_events("lab", 200.0, 1.5)]
    log.write_text("".join(json.dumps(event) + "\n" for event in events))

    def spawned(timeline: list[tuple[str, float, float]]) -> float:
        return next(median for name, median, _ in timeline if name == "QEMU spawned")

    every = lab_timelines([log], "lab")
    assert [round(spawned(t), 3) for t in every] == [0.2, 1.5]
    bringup = lab_timelines([log], "lab", [(99.0, 150.0)])
    assert [round(spawned(t), 3) for t in bringup] == [0.2]
    assert lab_timelines([log], "lab", []) == []
    assert lab_timelines([log], "other") == []
