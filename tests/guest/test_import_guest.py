"""An imported topology_converter lab on real guests: `qlinkctl import` with `--kinds` that
point the kinds at qlink's test guest, `up` in boot order, every cable seen by LLDP from both
ends (the cable between two ports of one switch too), the DOT file's fixed MACs read back
inside the guests, and `inventory` / `ssh-config` working against the running lab."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GuestFiles, Qlinkd
from tests.guest.harness import (
    close_consoles,
    kill_qemu_under,
    lldp_neighbors,
    open_consoles,
)

pytestmark = pytest.mark.guest

DOT = Path(__file__).parent / "data" / "import-lab.dot"
LAB = "import-lab"
NODES = ("spine01", "leaf01", "leaf02", "server01")
BOOT_TIMEOUT = 300.0
LLDP_TIMEOUT = 40.0
# From the DOT file: left_mac / right_mac.
FIXED_MACS = {
    ("leaf01", "swp51"): "44:38:39:00:01:51",
    ("spine01", "swp1"): "44:38:39:00:00:01",
    ("leaf02", "swp51"): "44:38:39:00:02:51",
    ("spine01", "swp2"): "44:38:39:00:00:02",
    ("server01", "eth1"): "44:38:39:00:0a:01",
}
CABLES = [
    (("leaf01", "swp51"), ("spine01", "swp1")),
    (("leaf02", "swp51"), ("spine01", "swp2")),
    (("leaf01", "swp49"), ("leaf02", "swp49")),
    (("server01", "eth1"), ("leaf01", "swp1")),
    (("server01", "eth2"), ("leaf02", "swp1")),
    (("leaf01", "swp10"), ("leaf01", "swp11")),
]


def kinds_yaml(guest: GuestFiles) -> str:
    """Both kinds the DOT file uses, booted as the test guest (its ports named like theirs)."""
    common = (f"kernel: {guest.kernel}, initrd: {guest.initrd}, accel: tcg, "
              "ready: {console: 'qlink-ready name='}")  # fmt: skip
    return (
        "kinds:\n"
        f"  cumulus-vx: {{{common}, cpus: 1, append: 'console=ttyS0 qlink.ifprefix=swp'}}\n"
        f"  linux: {{{common}, append: 'console=ttyS0 qlink.ifprefix=eth'}}\n"
    )


def with_guest_names(text: str) -> str:
    """The imported file with each node's `append` naming the guest after the node (the test
    guest takes its host name, which LLDP sends, from the kernel command line)."""
    lines = []
    for line in text.splitlines():
        lines.append(line)
        match = re.fullmatch(r"  ([a-z0-9-]+):  # import-lab\.dot:\d+", line)
        if match:
            prefix = "eth" if match.group(1).startswith("server") else "swp"
            lines.append(f"    append: 'console=ttyS0 qlink.name={match.group(1)} "
                         f"qlink.ifprefix={prefix}'")  # fmt: skip
    return "\n".join(lines) + "\n"


def expected_neighbors() -> dict[str, dict[str, tuple[str, str]]]:
    expected: dict[str, dict[str, tuple[str, str]]] = {}
    for (a_node, a_port), (b_node, b_port) in CABLES:
        expected.setdefault(a_node, {})[a_port] = (b_node, b_port)
        expected.setdefault(b_node, {})[b_port] = (a_node, a_port)
    return expected


@pytest.fixture
def imported_lab(qemu_binary: str, guest_files: GuestFiles) -> Iterator[tuple[Qlinkd, Path]]:
    root = Path(tempfile.mkdtemp(prefix="qlink-", dir="/tmp"))
    daemon = Qlinkd(root, ["--powerdown-timeout", "10"])
    try:
        daemon.start()
        yield daemon, root
    finally:
        problems = []
        if daemon.process is not None and daemon.process.poll() is None:
            result = daemon.ctl("down", LAB, "--force", timeout=180)
            if result.returncode not in (0, 2):
                problems.append(f"down: {result.stderr}")
            daemon.stop()
        leftovers = kill_qemu_under(root)
        if leftovers:
            problems.append(f"QEMU left running, killed: {leftovers}")
        if not os.environ.get("QLINK_KEEP_TMP"):
            shutil.rmtree(root, ignore_errors=True)
        assert not problems, problems


def test_an_imported_dot_lab_boots_in_order_and_every_cable_is_where_the_file_says(
    imported_lab: tuple[Qlinkd, Path], guest_files: GuestFiles
) -> None:
    daemon, root = imported_lab
    kinds = root / "kinds.yaml"
    kinds.write_text(kinds_yaml(guest_files))
    imported = root / "import-lab.yaml"
    daemon.ctl_ok("import", str(DOT), "--kinds", str(kinds), "-o", str(imported))
    imported.write_text(with_guest_names(imported.read_text()))

    # `up` of the DOT file as it is: its plan, in boot order (nothing started by a dry run).
    dry = daemon.ctl_ok("up", str(DOT), "--kinds", str(kinds), "--dry-run")
    assert "boot order: 1. spine01; 2. leaf01, leaf02; 3. server01" in dry

    started = time.monotonic()
    daemon.ctl_ok("up", str(imported), "--wait", "--timeout", str(BOOT_TIMEOUT), timeout=400)
    print(f"FIGURE up --wait of 4 imported nodes: {time.monotonic() - started:.1f} s")
    status = daemon.status()
    rows = {node: status[f"{LAB}/{node}"] for node in NODES}
    # One status read: times relative to it (0.1 s rounding, so 0.2 s of slack).
    launched = {node: -row["uptime"] for node, row in rows.items()}
    ready = {node: -row["uptime"] + row["time_to_ready"] for node, row in rows.items()}
    print(f"FIGURE launched (s before the status read): {launched}; ready: {ready}")
    # Stages: no leaf started before spine01 was ready, server01 not before both leaves were.
    assert launched["leaf01"] >= ready["spine01"] - 0.2
    assert launched["leaf02"] >= ready["spine01"] - 0.2
    assert launched["server01"] >= max(ready["leaf01"], ready["leaf02"]) - 0.2

    sockets = {node: Path(status[f"{LAB}/{node}"]["console"]) for node in NODES}
    asyncio.run(check_guests(sockets))
    check_inventory_and_ssh(daemon, root)


async def check_guests(sockets: dict[str, Path]) -> None:
    consoles = await open_consoles(sockets)
    try:
        expected = expected_neighbors()
        loop = asyncio.get_running_loop()
        begun = loop.time()
        while True:
            answers = await asyncio.gather(*(lldp_neighbors(c) for c in consoles.values()))
            seen = dict(zip(consoles, answers, strict=True))
            if seen == expected:
                break
            assert loop.time() - begun < LLDP_TIMEOUT, f"LLDP saw {seen}, expected {expected}"
            await asyncio.sleep(1.0)
        print(f"FIGURE LLDP both ends of all {len(CABLES)} cables: {loop.time() - begun:.1f} s")
        for (node, port), mac in FIXED_MACS.items():
            read = await consoles[node].run(f"cat /sys/class/net/{port}/address")
            assert read.strip() == mac, (node, port, read)
    finally:
        await close_consoles(consoles)


def check_inventory_and_ssh(daemon: Qlinkd, root: Path) -> None:
    inventory = root / "hosts.yaml"
    inventory.write_text(daemon.ctl_ok("inventory", "-o", "yaml"))
    ansible = Path(sys.executable).parent / "ansible-inventory"
    env = {**os.environ, "HOME": str(root), "ANSIBLE_LOCAL_TEMP": str(root / "ansible-tmp")}
    listing = json.loads(
        subprocess.run(
            [str(ansible), "-i", str(inventory), "--list"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=120,
        ).stdout
    )
    assert sorted(listing["_meta"]["hostvars"]) == sorted(NODES)
    assert sorted(listing["leaf"]["hosts"]) == ["leaf01", "leaf02"]
    assert sorted(listing["cumulus_vx"]["hosts"]) == ["leaf01", "leaf02", "spine01"]
    config = root / "ssh_config"
    config.write_text(daemon.ctl_ok("ssh-config"))
    ssh = shutil.which("ssh")
    assert ssh is not None
    done = subprocess.run([ssh, "-F", str(config), "leaf01", "cat /sys/class/net/swp51/address"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == FIXED_MACS[("leaf01", "swp51")]
