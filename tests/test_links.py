"""A NIC's socket (`runtime.links`): bound without sharing, connected so that the kernel takes
datagrams from the peer alone, and placed at its planned descriptor number in the child."""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qlink.errors import HostError, LaunchError, PortInUseError
from qlink.runtime import links
from qlink.runtime.links import (
    LinkSocket,
    open_link_socket,
    open_link_sockets,
    placement_actions,
)
from qlink.runtime.priority import lower_priority
from qlink.runtime.process import _spawn

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out, so free a moment ago."""
    holders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for holder in holders:
            holder.bind((LOOPBACK, 0))
        return [holder.getsockname()[1] for holder in holders]
    finally:
        for holder in holders:
            holder.close()


@contextmanager
def cable() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Both ends of one cable, as qlink opens them for two NICs."""
    a_port, b_port = free_ports(2)
    a = open_link_socket(LinkSocket(101, (LOOPBACK, a_port), (LOOPBACK, b_port)))
    b = open_link_socket(LinkSocket(101, (LOOPBACK, b_port), (LOOPBACK, a_port)))
    with a, b:
        yield a, b


def test_a_cable_carries_the_peers_datagrams_and_refuses_a_strangers() -> None:
    with cable() as (a, b), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        a.settimeout(2)
        b.send(b"from the peer")
        assert a.recv(100) == b"from the peer"
        # A stranger's datagrams, the empty one that stops a QEMU netdev among them, never
        # reach the socket: the kernel answers them with ICMP port unreachable.
        stranger.connect(a.getsockname())
        for payload in (b"", os.urandom(60), b"x" * 1500):
            stranger.send(payload)
            stranger.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                stranger.recv(100)
        b.send(b"still there")
        assert a.recv(100) == b"still there"  # and nothing the stranger sent came before it
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            a.recv(100)


def test_a_held_port_is_refused_and_nobody_can_share_ours() -> None:
    (port, other) = free_ports(2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind((LOOPBACK, port))
        with pytest.raises(PortInUseError) as caught:
            open_link_socket(LinkSocket(100, (LOOPBACK, port), (LOOPBACK, other)))
        assert (caught.value.port, caught.value.address) == (port, LOOPBACK)
    with (
        open_link_socket(LinkSocket(100, (LOOPBACK, port), (LOOPBACK, other))),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as thief,
    ):
        # Even asking to share, as QEMU's own `-netdev socket,udp=` binds, is refused.
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError, match="Address already in use") as refused:
            thief.bind((LOOPBACK, port))
        assert refused.value.errno == errno.EADDRINUSE


def test_a_failed_open_leaves_no_socket_behind() -> None:
    first, second, peer = free_ports(3)
    wanted = [
        LinkSocket(100, (LOOPBACK, first), (LOOPBACK, peer)),
        LinkSocket(101, (LOOPBACK, second), (LOOPBACK, peer)),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind((LOOPBACK, second))
        with pytest.raises(PortInUseError), open_link_sockets(wanted):
            pass
    # The first socket was opened, then closed when the second failed: its port is free.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, first))


def test_link_socket_of_a_plan_document() -> None:
    link = LinkSocket.parse(151, "127.0.0.1:20000", "127.0.0.1:20001")
    assert link == LinkSocket(151, ("127.0.0.1", 20000), ("127.0.0.1", 20001))


# --- placing descriptors in the child --------------------------------------------------------


def run_actions(table: dict[int, str], actions: list[links.FileAction]) -> dict[int, str]:
    """What the child's descriptor table is after `actions` (dup2 of a closed one is EBADF)."""
    result = dict(table)
    for action in actions:
        if action[0] == os.POSIX_SPAWN_DUP2:
            _, source, target = action  # type: ignore[misc]
            assert source in result, f"dup2 of closed descriptor {source}"
            result[target] = result[source]
        else:
            result.pop(action[1], None)
    return result


@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True).flatmap(
        lambda targets: st.tuples(
            st.just(targets),
            st.lists(st.integers(3, 60), min_size=len(targets), max_size=len(targets)),
        )
    )
)
def test_every_source_lands_on_its_target_whatever_the_numbers(
    case: tuple[list[int], list[int]],
) -> None:
    targets, sources = case
    moves = list(zip(sources, targets, strict=True))
    table = {number: f"open {number}" for number in range(121)}
    after = run_actions(table, placement_actions(moves))
    for source, target in moves:
        assert after[target] == table[source]
    # Below the temporary copies nothing else changed; above, a copy may have replaced a
    # descriptor of ours (close-on-exec, or it would leak into QEMU anyway), then closed it.
    involved = max(number for move in moves for number in move)
    for number, was in table.items():
        if number not in targets:
            assert after.get(number) == was or (number > involved and number not in after), number
    assert set(after) <= set(table)


def test_a_descriptor_above_the_limit_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (512, 4096))
    with pytest.raises(HostError, match=r"descriptor number 967, but the soft RLIMIT_NOFILE"):
        links.check_descriptor_limit(967)
    links.check_descriptor_limit(511)


REPORT = """
import json, os, socket
report = {}
for fd in (101, 102, 105):
    with socket.socket(fileno=os.dup(fd)) as s:
        report[fd] = [list(s.getsockname()), list(s.getpeername())]
report["open"] = sorted(int(n) for n in os.listdir("/proc/self/fd"))
print(json.dumps(report))
"""


def _inheritable(number: int) -> bool:
    try:
        return os.get_inheritable(number)
    except OSError:
        return False  # listdir's own descriptor, closed by now


def test_spawn_hands_each_socket_over_at_its_number_without_clobbering(tmp_path: Path) -> None:
    """Sources placed on purpose at each other's targets: a plain dup2 each would hand one
    socket over twice and lose another."""
    ports = free_ports(6)
    wanted = [
        LinkSocket(fd, (LOOPBACK, ports[i]), (LOOPBACK, ports[i + 3]))
        for i, fd in enumerate((101, 102, 105))
    ]
    log = tmp_path / "child.log"
    taken = {int(n) for n in os.listdir("/proc/self/fd")}
    inheritable = {n for n in taken if n > 105 and _inheritable(n)}
    assert not taken & {101, 102, 105, 1101, 1102, 1105}, "this test needs those numbers free"
    with open_link_sockets(wanted) as opened:
        # Move the parent's sockets onto the numbers of other targets: 102, 105, 101.
        parked = []
        for sock, number in zip(opened, (102, 105, 101), strict=True):
            os.dup2(sock.fileno(), number + 1000)
            parked.append(number + 1000)
        for source, number in zip(parked, (102, 105, 101), strict=True):
            os.dup2(source, number, inheritable=False)
            os.close(source)
        handover = [(number, link.fd) for number, link in zip((102, 105, 101), wanted, strict=True)]
        try:
            pid = _spawn([sys.executable, "-c", REPORT], log, handover)
            _, status = os.waitpid(pid, 0)
        finally:
            for number in (101, 102, 105):
                os.close(number)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
    report = json.loads(log.read_text())
    for link in wanted:
        assert report[str(link.fd)] == [list(link.local), list(link.remote)]
    # None of the temporary copies above 105 is left open: only what this process lets
    # every child inherit is there.
    assert {n for n in report["open"] if n > 105} <= inheritable


def test_a_spawn_that_cannot_start_closes_what_it_opened(tmp_path: Path) -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(LaunchError, match="cannot start"):
        _spawn(["/nonexistent/qemu"], tmp_path / "log", [])
    assert sorted(os.listdir("/proc/self/fd")) == before


NICE_REPORT = """
import os, sys, threading
os.fdopen(3).read()  # until the parent has reniced us and closed its end
later = []
thread = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
thread.start()
thread.join()
print(os.getpriority(os.PRIO_PROCESS, 0), later[0])
"""


def test_lowering_a_childs_priority_reaches_the_threads_it_makes_later(
    tmp_path: Path,
) -> None:
    """qlinkd's QEMUs run below it (`--vm-nice`): the main thread, and the threads it makes."""
    log = tmp_path / "log"
    own = os.getpriority(os.PRIO_PROCESS, 0)
    read_end, write_end = os.pipe()
    try:
        pid = _spawn([sys.executable, "-c", NICE_REPORT], log, [(read_end, 3)])
        lower_priority(pid, 5)
    finally:
        os.close(read_end)
    os.close(write_end)  # the child reads EOF only now, after the renice
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
    assert log.read_text().split() == [str(min(own + 5, 19))] * 2


def test_lowering_a_childs_priority_lowers_its_autogroup_when_the_kernel_groups_sessions(
    tmp_path: Path,
) -> None:
    """With autogroups on, a task's nice weighs only within its session: QEMU's session
    (its own) gets the nice instead."""
    switch = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if not switch.exists() or switch.read_text().strip() != "1":
        pytest.skip("the kernel does not group tasks by session (autogroup off)")
    read_end, write_end = os.pipe()
    try:
        pid = _spawn(
            [sys.executable, "-c", "import os; os.fdopen(3).read()"], tmp_path / "log",
            [(read_end, 3)],
        )  # fmt: skip
        lower_priority(pid, 5)
    finally:
        os.close(read_end)
    try:
        group = Path(f"/proc/{pid}/autogroup").read_text()
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
    if not group:
        pytest.skip("the child's cgroup has a CPU controller of its own: autogroups do not apply")
    assert group.split()[-1] == "5", group
    # Empty when this process is in the root session's group or a cgroup with its own
    # CPU controller: then any autogroup the child shows is a different one.
    ours = Path("/proc/self/autogroup").read_text().split()
    assert not ours or group.split()[0] != ours[0]
