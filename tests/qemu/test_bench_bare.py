"""The benchmark's bare launcher (`bench.bare`) on real QEMU 7.2, paused with -S: what each of
its two limits waits for. A QEMU whose `-device` names no netdev fails while building its
machine, after its monitor could already greet: waiting for the answer to a first command
tells it from a QEMU that started."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from bench import bare
from qlink.plan.argv import HostFacts
from qlink.plan.render import node_document
from tests.conftest import GuestFiles
from tests.qemu.test_link_sockets import pair_plan

pytestmark = pytest.mark.qemu

TIMEOUT = 30.0


def pair(root: Path, guest: GuestFiles, qemu_binary: str) -> list[bare.BareNode]:
    """r1 and r2 of a cable, paused, as the plan's JSON gives them to the launcher: the
    `-S` of qlinkd's start hold stays, as if the file asked for it."""
    host = HostFacts(qemu_binary=qemu_binary)
    nodes = []
    for name, node in pair_plan(root, guest).items():
        document = node_document(node, host)
        assert document["held"]
        assert "-S" in document["argv"]
        document["held"] = False
        nodes.append(bare.BareNode.from_plan(name, document))
    return nodes


async def kill_all(pids: dict[str, int]) -> None:
    for pid in pids.values():
        await bare.kill_and_wait(pid, TIMEOUT)


@pytest.mark.parametrize("answered", [False, True], ids=["greeting", "answered"])
async def test_both_limits_launch_qemu_that_starts(
    short_root: Path, guest_files: GuestFiles, qemu_binary: str, answered: bool
) -> None:
    nodes = pair(short_root, guest_files, qemu_binary)
    pids = await bare.launch(nodes, TIMEOUT, answered=answered)
    try:
        assert set(pids) == {"r1", "r2"}
        assert all(psutil.pid_exists(pid) for pid in pids.values())
    finally:
        await kill_all(pids)


async def test_the_answer_tells_a_qemu_that_fails_to_build_its_machine(
    short_root: Path, guest_files: GuestFiles, qemu_binary: str
) -> None:
    r1, _ = pair(short_root, guest_files, qemu_binary)
    broken = bare.BareNode(
        name=r1.name,
        argv=(*r1.argv, "-device", "virtio-net-pci,netdev=nosuch"),
        qmp_socket=r1.qmp_socket,
        console_socket=r1.console_socket,
        qemu_log=r1.qemu_log,
        console_log=r1.console_log,
        links=r1.links,
    )
    # Its greeting may come before the failure or not (a race inside QEMU); the answer never.
    with pytest.raises((bare.BareError, BaseExceptionGroup)) as raised:
        await bare.launch([broken], TIMEOUT, answered=True)
    assert "can't find value 'nosuch'" in bare.describe(raised.value), raised.value
