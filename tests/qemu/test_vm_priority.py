"""`--vm-nice` on a real QEMU: once `launch` returns (QMP answered), every thread QEMU has
runs the given steps below qlinkd, vCPU included."""

from __future__ import annotations

import os
from pathlib import Path

from qlink.plan.argv import HostFacts, build_argv
from qlink.runtime.handles import VmRuntime
from qlink.runtime.links import LinkSocket
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


async def test_a_launched_qemu_runs_every_thread_below_qlinkd(
    short_root: Path, qemu_binary: str, guest_files: GuestFiles
) -> None:
    r1 = pair_plan(short_root, guest_files)["r1"]
    argv = [*build_argv(r1, HostFacts(qemu_binary=qemu_binary)), "-S"]
    own = os.getpriority(os.PRIO_PROCESS, 0)
    process, qmp = await VmRuntime(vm_nice=5).launch(argv, r1, timeout=20, qmp_name="test")
    try:
        nices = thread_nices(process.pid)
        assert any(name.startswith("CPU 0/") for name in nices), nices  # debug-threads=on
        assert set(nices.values()) == {min(own + 5, 19)}, nices
    finally:
        await qmp.execute("quit")
        await process.wait()
        await qmp.close()


async def test_a_qemu_dropped_at_the_spawn_runs_every_thread_below_qlinkd_too(
    short_root: Path, qemu_binary: str, guest_files: GuestFiles
) -> None:
    r1 = pair_plan(short_root, guest_files)["r1"]
    argv = [*build_argv(r1, HostFacts(qemu_binary=qemu_binary)), "-S"]
    own = os.getpriority(os.PRIO_PROCESS, 0)
    links = [LinkSocket.of(nic) for nic in r1.nics]
    process, qmp = await launch(argv, r1.paths, 20, "test", links=links, nice=5, nice_at_spawn=True)
    try:
        assert set(thread_nices(process.pid).values()) == {min(own + 5, 19)}
    finally:
        await qmp.execute("quit")
        await process.wait()
        await qmp.close()
