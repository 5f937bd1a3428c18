"""When a starting QEMU drops to --vm-nice (`runtime.priority`): once its QMP answered while at
most one per core is starting; at once, the ones already spawned included, when more start."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.runtime import handles
from qlink.runtime.handles import VmRuntime
from qlink.runtime.priority import LaunchPriority, StartPriorities
from qlink.topology import parse_topology_text

NICE = 10


class Lowered:
    """Records each drop, in order, in place of `lower_priority`."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, pid: int, nice: int) -> None:
        self.calls.append((pid, nice))

    @property
    def pids(self) -> list[int]:
        return [pid for pid, _ in self.calls]


def test_a_start_alone_drops_once_its_qmp_answered() -> None:
    lowered = Lowered()
    priorities = StartPriorities(NICE, cores=2, lower=lowered)
    with priorities.starting() as restart:
        restart.spawned(101)
        assert lowered.calls == []  # at qlinkd's priority while it starts
        restart.answered(101)
        assert lowered.calls == [(101, NICE)]


def test_a_storm_drops_every_starting_qemu_at_once_the_early_ones_included() -> None:
    lowered = Lowered()
    priorities = StartPriorities(NICE, cores=2, lower=lowered)
    with contextlib.ExitStack() as stack:
        first, second = (stack.enter_context(priorities.starting()) for _ in range(2))
        first.spawned(101)
        second.spawned(102)
        assert lowered.calls == []
        third = stack.enter_context(priorities.starting())  # more than one per core now
        assert sorted(lowered.pids) == [101, 102]
        third.spawned(103)
        assert lowered.pids[-1] == 103  # dropped at the spawn
        for slot, pid in ((first, 101), (second, 102), (third, 103)):
            slot.answered(pid)
        assert sorted(lowered.pids) == [101, 102, 103]  # each once, never again


def test_a_failed_start_is_forgotten_and_nice_zero_turns_the_policy_off() -> None:
    lowered = Lowered()
    priorities = StartPriorities(NICE, cores=1, lower=lowered)
    with priorities.starting() as failed:
        failed.spawned(101)
    with priorities.starting(), priorities.starting():
        pass  # a storm after the failed start's QEMU is gone: nothing of it to drop
    assert lowered.calls == []

    off = StartPriorities(0, cores=1, lower=lowered)
    with off.starting() as alone, off.starting() as storm:
        alone.spawned(201)
        storm.spawned(202)
        alone.answered(201)
    assert lowered.calls == []


LAB = """\
name: four
defaults: {kernel: /k}
nodes: {a: {}, b: {}, c: {}, d: {}}
links:
  - [a:eth1, b:eth1]
  - [c:eth1, d:eth1]
"""


async def test_the_runtime_tells_the_policy_of_every_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`VmRuntime.launch` hands each launch its slot of one policy, with --vm-nice and the
    host's cores: four launches in flight on two cores are a storm."""
    plan, _ = plan_lab(parse_topology_text(LAB, "lab.yaml"), Layout.under(tmp_path))
    lowered = Lowered()
    monkeypatch.setattr(handles, "CORES", 2)
    monkeypatch.setattr("qlink.runtime.priority.lower_priority", lowered)
    in_flight = asyncio.Barrier(4)

    async def launch(argv: Any, paths: Any, timeout: Any, name: str, *args: Any, **kw: Any) -> Any:
        priority: LaunchPriority = kw["priority"]
        pid = 100 + "abcd".index(name)
        priority.spawned(pid)
        await in_flight.wait()
        priority.answered(pid)
        return name, name

    monkeypatch.setattr("qlink.runtime.process.launch", launch)
    runtime = VmRuntime(vm_nice=NICE)
    async with asyncio.TaskGroup() as group:
        for node in "abcd":
            group.create_task(runtime.launch([], plan.nodes[node], 5.0, node))
    assert sorted(lowered.calls) == [(pid, NICE) for pid in (100, 101, 102, 103)]
