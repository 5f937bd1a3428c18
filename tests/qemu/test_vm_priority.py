"""`--vm-nice` on a real QEMU: once `launch` returns (QMP answered), every thread QEMU has
runs the given steps below qlinkd, vCPU included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlink.plan.argv import HostFacts, build_argv
from qlink.runtime.links import LinkSocket
from qlink.runtime.priority import StartPriorities
from qlink.runtime.process import launch
from tests.conftest import GuestFiles
from tests.qemu.test_link_sockets import pair_plan


def thread_nices(pid: int) -> dict[str, int]:
    """Each thread's name → its nice (field 19 of /proc/PID/task/TID/stat)."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        found[f"{name}/{task.name}"] = int(stat[stat.rindex(")") + 2 :].split()[16])
    return found


@pytest.mark.parametrize("cores", [1, 0], ids=["once-up", "at-the-spawn"])
async def test_a_launched_qemu_runs_every_thread_below_qlinkd(
    short_root: Path, qemu_binary: str, guest_files: GuestFiles, cores: int
) -> None:
    """Whether it dropped once its QMP answered (alone on one core) or right at the spawn
    (a storm: more starting than cores), every thread ends up `nice` steps below us."""
    r1 = pair_plan(short_root, guest_files)["r1"]
    argv = build_argv(r1, HostFacts(qemu_binary=qemu_binary))  # -S, never released here
    own = os.getpriority(os.PRIO_PROCESS, 0)
    links = [LinkSocket.of(nic) for nic in r1.nics]
    with StartPriorities(5, cores).starting() as priority:
        process, qmp = await launch(argv, r1.paths, 20, "test", links=links, priority=priority)
    try:
        nices = thread_nices(process.pid)
        assert any(name.startswith("CPU 0/") for name in nices), nices  # debug-threads=on
        assert set(nices.values()) == {min(own + 5, 19)}, nices
    finally:
        await qmp.execute("quit")
        await process.wait()
        await qmp.close()
