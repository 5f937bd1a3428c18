"""The start hold (`runtime/hold.py`): a started QEMU's CPUs run once no start beside it is
still on its way; alone at once, never later than the limit. And the plan's side: which
nodes start held, and the one `-S` of their argv."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qlink.plan.argv import HostFacts, build_argv
from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.runtime.handles import VmRuntime
from qlink.runtime.hold import HeldStart, StartHold
from qlink.topology import parse_topology_text

DEADLINE = 5.0


async def every_task_blocked() -> None:
    """Let every ready task run until it waits on something: a start the hold released
    would have returned by then. Loop turns, not wall time."""
    for _ in range(10):
        await asyncio.sleep(0)


async def released_in(start: HeldStart, seconds: float = DEADLINE) -> None:
    async with asyncio.timeout(seconds):
        await start.released()


async def test_a_start_alone_runs_at_once() -> None:
    with StartHold().starting() as start:
        await released_in(start, 0.5)


async def test_the_answered_wait_until_every_start_beside_them_answered() -> None:
    hold = StartHold()
    released: list[str] = []

    async def answer(name: str, start: HeldStart) -> None:
        await start.released()
        released.append(name)

    with hold.starting() as a, hold.starting() as b, hold.starting() as c:
        waiting = [asyncio.create_task(answer("a", a)), asyncio.create_task(answer("b", b))]
        await every_task_blocked()
        assert released == []  # c has not answered
        await released_in(c)
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*waiting)
    assert sorted(released) == ["a", "b"]


async def test_a_start_that_failed_holds_nobody() -> None:
    hold = StartHold()
    with hold.starting() as answered:
        with hold.starting():
            waiting = asyncio.create_task(released_in(answered))
            await every_task_blocked()
            assert not waiting.done()
            # The other launch fails (its block ends without an answer).
        await waiting


async def test_a_start_that_hangs_holds_the_others_only_up_to_the_limit() -> None:
    hold = StartHold(limit=0.1)
    with hold.starting() as answered, hold.starting():
        started = asyncio.get_running_loop().time()
        await released_in(answered)
        waited = asyncio.get_running_loop().time() - started
    assert 0.09 <= waited < 1.0


async def test_a_start_after_a_release_begins_a_new_batch() -> None:
    hold = StartHold()
    with hold.starting() as first:
        await released_in(first, 0.5)
    with hold.starting() as second, hold.starting() as third:
        waiting = asyncio.create_task(released_in(second))
        await every_task_blocked()
        assert not waiting.done()
        await released_in(third)
        await waiting


LAB = """\
name: l
defaults: {kernel: /k}
nodes:
  a: {}
  b: {extra_args: ["-S"]}
links:
  - [a:eth1, b:eth1]
"""


def test_every_node_starts_held_but_one_the_file_pauses_itself(tmp_path: Path) -> None:
    plan, _ = plan_lab(parse_topology_text(LAB, "lab.yaml"), Layout.under(tmp_path))
    a, b = plan.nodes["a"], plan.nodes["b"]
    assert a.held
    assert not b.held  # paused on purpose: qlinkd never runs its CPUs
    for node in (a, b):
        assert build_argv(node, HostFacts()).count("-S") == 1


async def test_the_runtime_holds_only_held_nodes_and_all_of_them_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, _ = plan_lab(parse_topology_text(LAB, "lab.yaml"), Layout.under(tmp_path))
    given: dict[str, Any] = {}

    async def launch(argv: Any, paths: Any, timeout: Any, name: str, *args: Any, **kw: Any) -> Any:
        given[name] = kw["held"]
        if kw["held"] is not None:
            await kw["held"].released()
        return name, name

    monkeypatch.setattr("qlink.runtime.process.launch", launch)
    runtime = VmRuntime()
    async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as group:
        for node in "ab":
            group.create_task(runtime.launch([], plan.nodes[node], 5.0, node))
    assert given["a"] is not None
    assert given["b"] is None
