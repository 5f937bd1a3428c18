"""qlinkd with real QEMU and no guest: VMs paused with -S, so each test takes seconds.

Each test runs a real `qlinkd` process and drives it with `qlinkctl`, as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import GuestFiles, Qlinkd, cmdline_of, qemu_pid_of, write_lab

pytestmark = pytest.mark.qemu

StartDaemon = Callable[..., Qlinkd]

# Fast policies for tests; the defaults are for labs.
FAST = ("--backoff-initial", "0.2", "--backoff-attempts", "3", "--powerdown-timeout", "0",
        "--unplug-timeout", "1")  # fmt: skip


def paused_lab(
    root: Path,
    guest: GuestFiles,
    *,
    extra_nodes: str = "",
    extra_links: str = "",
    ports: str = "",
) -> Path:
    """Three paused nodes in a triangle: QEMU is real, the guest never runs."""
    return write_lab(
        root,
        f"""\
        name: t
        defaults:
          memory: 64
          accel: tcg
          kernel: {guest.kernel}
          extra_args: [-S]
        nodes:
          a: {{}}
          b: {{}}
          c: {{}}
        {extra_nodes}
        links:
          - [a:eth1, b:eth1]
          - [b:eth2, c:eth2]
          - endpoints: [c:eth3, a:eth3]
        {ports}
        {extra_links}
        """,
        name="t.yaml",
    )


def pids(daemon: Qlinkd) -> dict[str, int]:
    return {key: row["pid"] for key, row in daemon.status().items()}


def udp_ends(pid: int) -> dict[int, tuple[tuple[str, int], tuple[str, int]]]:
    """The NIC sockets a QEMU holds: descriptor number → (local end, peer end)."""
    return {
        c.fd: (tuple(c.laddr), tuple(c.raddr))  # type: ignore[misc]
        for c in psutil.Process(pid).net_connections(kind="udp4")
    }


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """For a state another process reaches; the daemon offers no event stream for tests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_up_status_links_down(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    lab = paused_lab(short_root, guest_files)
    # Every verb with -o json prints JSON and nothing else on stdout.
    assert json.loads(daemon.ctl_ok("up", str(lab), "-o", "json"))["failed"] == {}
    status = daemon.status()
    assert {key: row["state"] for key, row in status.items()} == {
        "t/a": "running", "t/b": "running", "t/c": "running",
    }  # fmt: skip
    for key, row in status.items():
        assert qemu_pid_of(short_root, "t", key.split("/")[1]) == row["pid"]
    links = json.loads(daemon.ctl_ok("links", "-o", "json"))
    assert len(links) == 3
    a_end = links[0]["a"]
    assert a_end["endpoint"] == "a:eth1"
    assert a_end["port"] == status["t/a"]["ports"]["eth1"]
    table = daemon.ctl_ok("status")
    assert table.splitlines()[0].split() == [
        "LAB",
        "NODE",
        "STATE",
        "READY",
        "ACCEL",
        "PID",
        "UPTIME",
        "RESTARTS",
        "SSH",
        "PORTS",
    ]
    assert json.loads(daemon.ctl_ok("down", "t", "-o", "json"))["failed"] == {}
    assert daemon.status() == {}
    for row in status.values():
        assert not psutil.pid_exists(row["pid"]) or psutil.Process(row["pid"]).status() == "zombie"


def test_restart_replaces_one_qemu_with_the_same_argv(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    before = pids(daemon)
    argv_before = cmdline_of(before["t/b"])
    sockets_before = udp_ends(before["t/b"])
    assert set(sockets_before) == {101, 102}  # eth1 and eth2 at 100 + their positions
    started = time.monotonic()
    daemon.ctl_ok("restart", "b")
    elapsed = time.monotonic() - started
    after = pids(daemon)
    assert after["t/a"] == before["t/a"]
    assert after["t/c"] == before["t/c"]
    assert after["t/b"] != before["t/b"]
    assert cmdline_of(after["t/b"]) == argv_before  # same MACs, same PCI places
    assert udp_ends(after["t/b"]) == sockets_before  # same ports, same peers
    assert daemon.status()["t/b"]["restarts"] == 1
    print(f"restart of a paused node: {elapsed:.2f} s (qlinkctl round trip included)")


def test_stop_and_start_are_remembered(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    pid_a = pids(daemon)["t/a"]
    daemon.ctl_ok("stop", "a")
    assert daemon.status()["t/a"]["state"] == "stopped"
    # `up` again does not start what an operator stopped, nor touch what runs.
    running = pids(daemon)
    daemon.ctl_ok("up", str(short_root / "t.yaml"))
    assert pids(daemon) == running
    daemon.ctl_ok("start", "t/a")
    assert daemon.status()["t/a"]["state"] == "running"
    assert pids(daemon)["t/a"] != pid_a


def test_killed_qemu_is_restarted_with_same_identity(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    before = pids(daemon)
    argv = cmdline_of(before["t/c"])
    os.kill(before["t/c"], signal.SIGKILL)
    wait_until(
        lambda: (
            (row := daemon.status()["t/c"])["state"] == "running" and row["pid"] != before["t/c"]
        ),
        timeout=20,
        what="c to be restarted",
    )
    after = pids(daemon)
    assert cmdline_of(after["t/c"]) == argv
    assert (after["t/a"], after["t/b"]) == (before["t/a"], before["t/b"])
    row = daemon.status()["t/c"]
    assert row["restarts"] == 1
    assert row["last_exit"] == "killed by SIGKILL"


def test_crash_loop_ends_in_failed_and_spares_the_others(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    lab = paused_lab(
        short_root,
        guest_files,
        extra_nodes="  crasher: {extra_args: [-S, -device, no-such-device]}",
        extra_links="  - [crasher:eth1, a:eth9]",
    )
    result = daemon.ctl("up", str(lab))
    assert result.returncode == 1, result.stderr
    assert "crasher" in result.stderr
    assert "no-such-device" in result.stderr
    status = daemon.status()
    assert status["t/crasher"]["state"] == "failed"
    assert status["t/crasher"]["failures"] == 3
    assert {status[key]["state"] for key in ("t/a", "t/b", "t/c")} == {"running"}
    # An operator's start clears FAILED and tries again (and fails again, the same way).
    retry = daemon.ctl("start", "crasher")
    assert retry.returncode == 1
    assert daemon.status()["t/crasher"]["state"] == "failed"


def test_daemon_killed_then_restarted_adopts_every_vm(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    first = qlinkd(*FAST)
    first.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    before = pids(first)
    first.kill(signal.SIGKILL)
    for pid in before.values():
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert first.ctl("status").returncode == 3  # nobody answers
    started = time.monotonic()
    second = qlinkd(*FAST)
    status = second.status()
    adopted_in = time.monotonic() - started
    assert {key: row["pid"] for key, row in status.items()} == before
    assert {row["state"] for row in status.values()} == {"running"}
    assert "vm_adopted" in second.log()
    print(f"new qlinkd reported all VMs running {adopted_in:.2f} s after it was started")
    # The adopted VMs are fully managed: restart one.
    second.ctl_ok("restart", "a")
    after = pids(second)
    assert after["t/a"] != before["t/a"]
    assert (after["t/b"], after["t/c"]) == (before["t/b"], before["t/c"])


def test_vm_that_died_while_the_daemon_was_away_is_restarted(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    first = qlinkd(*FAST)
    first.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    before = pids(first)
    first.kill(signal.SIGKILL)
    os.kill(before["t/b"], signal.SIGKILL)
    second = qlinkd(*FAST)
    wait_until(lambda: second.status()["t/b"]["state"] == "running", 20, "b to come back")
    after = pids(second)
    assert after["t/b"] != before["t/b"]
    assert (after["t/a"], after["t/c"]) == (before["t/a"], before["t/c"])


def test_a_reused_pid_is_never_adopted(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    first = qlinkd(*FAST)
    first.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    first.kill(signal.SIGKILL)
    # Make the record of a point at a live process that is not that VM: this test process.
    record_path = short_root / "lib/labs/t/nodes/a/process.json"
    record = json.loads(record_path.read_text())
    old_pid = record["pid"]
    record["pid"] = os.getpid()
    record_path.write_text(json.dumps(record))
    os.kill(old_pid, signal.SIGKILL)
    second = qlinkd(*FAST)
    wait_until(lambda: second.status()["t/a"]["state"] == "running", 20, "a to be started anew")
    assert second.status()["t/a"]["pid"] not in (os.getpid(), old_pid)
    assert '"verdict": "stranger"' in second.log()


def test_hung_qemu_is_killed_and_restarted(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST, "--liveness-interval", "0.3")
    daemon.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    before = pids(daemon)
    os.kill(before["t/a"], signal.SIGSTOP)  # QMP stops answering, the process stays
    wait_until(
        lambda: (
            (row := daemon.status()["t/a"])["state"] == "running" and row["pid"] != before["t/a"]
        ),
        timeout=30,
        what="the hung a to be replaced",
    )
    assert "vm_hung" in daemon.log()
    assert pids(daemon)["t/b"] == before["t/b"]


def test_port_held_by_another_process_refuses_up_and_starts_nothing(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    lab = paused_lab(short_root, guest_files, ports="    ports: [28901, 28902]")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 28902))
        result = daemon.ctl("up", str(lab))
    assert result.returncode == 1
    assert "127.0.0.1:28902 is already bound" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr
    assert "nothing was started" in result.stderr
    assert all(row["state"] != "running" for row in daemon.status().values())
    assert not list((short_root / "run" / "t").glob("*/qemu.pid"))


def test_second_daemon_on_the_same_root_refuses(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    first = qlinkd(*FAST)
    second = subprocess.run(
        [sys.executable, "-m", "qlink.qlinkd", "--root", str(short_root)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert f"another qlinkd (pid {first.process.pid if first.process else '?'})" in second.stderr
    assert first.ctl("status").returncode == 0


def test_bad_file_on_a_running_lab_changes_nothing(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    lab = paused_lab(short_root, guest_files)
    daemon.ctl_ok("up", str(lab))
    before = pids(daemon)
    lab.write_text(lab.read_text().replace("[b:eth2, c:eth2]", "[b:eth2, zz:eth2]"))
    result = daemon.ctl("up", str(lab))
    assert result.returncode == 2
    assert f"{lab}:14: links[1].endpoints[1]: unknown node 'zz'" in result.stderr
    assert pids(daemon) == before


def test_a_link_whose_port_is_taken_is_refused_before_anything_is_plugged(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    lab = paused_lab(short_root, guest_files)
    daemon.ctl_ok("up", str(lab))
    before = pids(daemon)
    lab.write_text(
        lab.read_text().replace(
            "  - [a:eth1, b:eth1]",
            "  - [a:eth1, b:eth1]\n  - endpoints: [a:eth5, c:eth5]\n    ports: [28911, 28912]",
        )
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 28912))
        result = daemon.ctl("up", str(lab))
    assert result.returncode == 1
    assert "cannot plug c:eth5: UDP 127.0.0.1:28912 is already bound" in result.stderr
    assert "nothing was changed" in result.stderr
    assert pids(daemon) == before
    for node in ("a", "c"):
        devices = daemon.ctl_ok("qmp", node, "qom-list", "path=/machine/peripheral")
        assert '"nic-eth1"' in devices or '"nic-eth2"' in devices  # the listing is real
        assert '"nic-eth5"' not in devices
    assert len(json.loads(daemon.ctl_ok("links", "-o", "json"))) == 3


def test_unreachable_daemon_exits_3(short_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qlink.cli", "--root", str(short_root), "status"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 3
    assert "qlinkd is not answering" in result.stderr


def test_unknown_node_is_bad_usage(qlinkd: StartDaemon) -> None:
    daemon = qlinkd(*FAST)
    result = daemon.ctl("restart", "nope")
    assert result.returncode == 2
    assert "no node 'nope'" in result.stderr


def link_states(daemon: Qlinkd, node: str) -> defaultdict[str, bool]:
    """The carrier of each of the node's netdevs, from the commands qlinkd issued: a QEMU
    starts with every link up (`qemu_spawned`), and qlinkd sends set_link (`carrier_set`)
    only to change one.

    QEMU 7.2 reports a netdev's link state nowhere over QMP (not even in `info network`), so
    this tier checks the commands qlinkd issued; the guest tier checks what guests see.
    """
    states: defaultdict[str, bool] = defaultdict(lambda: True)
    for line in daemon.log().splitlines():
        if '"carrier_' not in line and '"qemu_spawned"' not in line:
            continue
        event = json.loads(line)
        assert event["event"] != "carrier_not_set", event
        if event.get("node") != node:
            continue
        if event["event"] == "qemu_spawned":
            states.clear()
        else:
            states[event["interface"]] = event["up"]
    return states


def test_link_down_cuts_both_ends_and_is_remembered(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    # A node that ran before its peers lost carrier towards them, and got it back when they
    # ran: what `link` does next is then the last word on each end.
    ends = {"a": ("eth1", "eth3"), "b": ("eth1", "eth2"), "c": ("eth2", "eth3")}
    wait_until(
        lambda: all(link_states(daemon, n)[i] for n, ifs in ends.items() for i in ifs),
        10,
        "carrier on every end",
    )
    daemon.ctl_ok("link", "down", "b:eth1")
    assert link_states(daemon, "a")["eth1"] is False
    assert link_states(daemon, "b")["eth1"] is False
    assert link_states(daemon, "b")["eth2"] is True  # the other cable is untouched
    links = {row["link"]: row for row in json.loads(daemon.ctl_ok("links", "-o", "json"))}
    assert links["a:eth1--b:eth1"]["admin"] == "down"
    # The cut survives a restart of either end and of qlinkd.
    daemon.ctl_ok("restart", "--force", "a")
    # `restart` answers once a runs; its carrier pass follows.
    wait_until(lambda: link_states(daemon, "a")["eth1"] is False, 10, "a:eth1 cut after restart")
    daemon.kill()
    daemon = qlinkd(*FAST)  # adopts a and b; the cut is in the lab's record
    links = {row["link"]: row for row in json.loads(daemon.ctl_ok("links", "-o", "json"))}
    assert links["a:eth1--b:eth1"]["admin"] == "down"
    assert links["a:eth1--b:eth1"]["b"]["carrier"] == "down (admin)"
    daemon.ctl_ok("link", "up", "a:eth1")
    assert link_states(daemon, "a")["eth1"] is True
    assert link_states(daemon, "b")["eth1"] is True


def test_carrier_follows_the_peer(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    daemon.ctl_ok("up", str(paused_lab(short_root, guest_files)))
    daemon.ctl_ok("stop", "--force", "b")
    wait_until(lambda: link_states(daemon, "a")["eth1"] is False, 10, "a:eth1 to lose carrier")
    assert link_states(daemon, "c")["eth2"] is False
    assert link_states(daemon, "a")["eth3"] is True  # a--c does not involve b
    links = {row["link"]: row for row in json.loads(daemon.ctl_ok("links", "-o", "json"))}
    assert links["a:eth1--b:eth1"]["a"]["carrier"] == "down (b not running)"
    daemon.ctl_ok("start", "b")
    # One pass sets both ends, one after the other: wait for the second too.
    wait_until(
        lambda: link_states(daemon, "a")["eth1"] and link_states(daemon, "c")["eth2"],
        10,
        "a:eth1 and c:eth2 to get carrier back",
    )


def qmp_json(daemon: Qlinkd, node: str, command: str, *arguments: str) -> Any:
    """A QMP command's result through `qlinkctl qmp`, which prints strings bare."""
    output = daemon.ctl_ok("qmp", node, command, *arguments).strip()
    try:
        return json.loads(output)
    except json.JSONDecodeError:
        return output


def test_live_edit_restarts_only_what_changed(
    qlinkd: StartDaemon, short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    lab = paused_lab(short_root, guest_files)
    daemon.ctl_ok("up", str(lab))
    before = pids(daemon)
    ports_before = {key: row["ports"] for key, row in daemon.status().items()}
    # Add node d with a link to c, and give a more memory: a restarts, c gets a NIC plugged
    # in without a restart, b is untouched.
    lab.write_text(
        lab.read_text()
        .replace("  c: {}", "  c: {}\n  d: {}")
        .replace("  a: {}", "  a: {memory: 96}")
        .replace("  - [a:eth1, b:eth1]", "  - [a:eth1, b:eth1]\n  - [c:eth4, d:eth4]")
    )
    dry = daemon.ctl_ok("up", "--dry-run", str(lab))
    assert "start d: new node" in dry
    assert "restart a: command line changed: - -m 64M; + -m 96M" in dry
    assert "replug c: plug eth4 (to d:eth4)" in dry
    assert pids(daemon) == before  # a dry run touches nothing
    daemon.ctl_ok("up", str(lab))
    after = pids(daemon)
    assert after["t/b"] == before["t/b"]
    assert after["t/a"] != before["t/a"]
    assert after["t/c"] == before["t/c"]
    assert daemon.status()["t/d"]["state"] == "running"
    ports_after = {key: row["ports"] for key, row in daemon.status().items()}
    for key, ports in ports_before.items():
        for interface, port in ports.items():
            assert ports_after[key][interface] == port  # untouched links keep their ports
    # The plugged NIC is the one c's new command line makes: same MAC, same PCI place.
    planned = json.loads(daemon.ctl_ok("plan", str(lab), "-o", "json"))["nodes"]["c"]["nics"]
    eth4 = next(nic for nic in planned if nic["interface"] == "eth4")
    nic_path = "path=/machine/peripheral/nic-eth4"
    assert qmp_json(daemon, "c", "qom-get", nic_path, "property=mac") == eth4["mac"]
    assert qmp_json(daemon, "c", "qom-get", nic_path, "property=addr") == (
        int(eth4["pci"]["addr"], 16) << 3
    )
    bus = eth4["pci"]["bus"]
    assert qmp_json(daemon, "c", "qom-get", nic_path, "property=parent_bus") == (
        f"/machine/peripheral/{bus}/{bus}"
    )
    assert link_states(daemon, "c")["eth4"] is True  # d runs

    # Removing d stops just d; c's guest (paused: it never answers the unplug request)
    # keeps the NIC, so after the unplug timeout c restarts without it.
    lab.write_text(lab.read_text().replace("  d: {}\n", "").replace("  - [c:eth4, d:eth4]\n", ""))
    dry = daemon.ctl_ok("up", "--dry-run", str(lab))
    assert "replug c: unplug eth4 (to d:eth4)" in dry
    daemon.ctl_ok("up", str(lab))
    final = pids(daemon)
    assert "t/d" not in final
    assert final["t/b"] == before["t/b"]
    assert final["t/a"] == after["t/a"]
    assert final["t/c"] != after["t/c"]
    assert "net-eth4" not in " ".join(cmdline_of(final["t/c"]))
