"""When a starting QEMU drops to --vm-nice (`VmRuntime.launch`): after its QMP answered while
at most one per core is starting, at the spawn when more start at once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.runtime import handles
from qlink.runtime.handles import VmRuntime
from qlink.topology import parse_topology_text

LAB = """\
name: four
defaults: {kernel: /k}
nodes: {a: {}, b: {}, c: {}, d: {}}
links:
  - [a:eth1, b:eth1]
  - [c:eth1, d:eth1]
"""


async def test_only_launches_beyond_one_per_core_drop_at_the_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, _ = plan_lab(parse_topology_text(LAB, "lab.yaml"), Layout.under(tmp_path))
    seen: dict[str, tuple[int, bool]] = {}
    arrived = asyncio.Condition()
    release = asyncio.Event()

    async def launch(argv: Any, paths: Any, timeout: Any, name: str, *args: Any, **kw: Any) -> Any:
        async with arrived:
            seen[name] = (kw["nice"], kw["nice_at_spawn"])
            arrived.notify_all()
        await release.wait()  # every launch of the batch is in flight at once
        return name, name

    async def until_seen(count: int) -> None:
        async with arrived:
            await arrived.wait_for(lambda: len(seen) == count)

    monkeypatch.setattr("qlink.runtime.process.launch", launch)
    monkeypatch.setattr(handles, "CORES", 2)
    runtime = VmRuntime(vm_nice=10)
    starts = [
        asyncio.create_task(runtime.launch([], plan.nodes[node], 5.0, node)) for node in "abcd"
    ]
    await until_seen(4)
    release.set()
    await asyncio.gather(*starts)
    assert seen == {"a": (10, False), "b": (10, False), "c": (10, True), "d": (10, True)}

    # Alone again (a restart): back to its full priority until it is up.
    release.clear()
    again = asyncio.create_task(runtime.launch([], plan.nodes["a"], 5.0, "a-again"))
    await until_seen(5)
    release.set()
    await again
    assert seen["a-again"] == (10, False)
