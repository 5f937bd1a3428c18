"""qlinkd as a real systemd service: systemd as PID 1 in a booted systemd-nspawn container
(guest/build-systemd-root), this checkout bind-mounted at its own path, the unit installed by
scripts/install-service. Type=notify reaches `active`, a restart and a stop of the service
leave every VM running with its PID and the next qlinkd adopts it, and the log lines reach
journald as fields."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GuestFiles

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
QLINKCTL = REPO / ".venv" / "bin" / "qlinkctl"


def systemd_root() -> Path:
    """The container's root directory, built once and cached (a no-op when up to date)."""
    built = subprocess.run(
        [str(REPO / "guest" / "build-systemd-root")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    return Path(built.stdout.strip())


class Container:
    """A booted container; commands run in it through nsenter into its init's namespaces."""

    def __init__(self, root: Path, binds: list[Path], log: Path) -> None:
        self.log = log
        name = f"qlink-test-{os.getpid()}"
        argv = [
            "systemd-nspawn", "--quiet", "--boot", "--directory", str(root),
            f"--machine={name}",
            # changes to the root land in a tmpfs and vanish with the container
            "--volatile=overlay",
            # no host systemd or machined is needed for any of this
            "--register=no", "--keep-unit",
            # its own loopback: the lab's cables cannot meet anything of the host's
            "--private-network",
            "--console=pipe",
            # nspawn tells our NOTIFY_SOCKET READY=1 once the container's systemd has booted
            "--notify-ready=yes",
            *(f"--bind-ro={path}" for path in binds[:1]),
            *(f"--bind={path}" for path in binds[1:]),
        ]  # fmt: skip
        notify_path = log.parent / "notify.sock"
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
            log.open("wb") as output,
        ):
            notify.bind(str(notify_path))
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )  # fmt: skip
            self.leader = self._find_leader(timeout=30)
            self._wait_booted(notify, timeout=120)

    def _wait_booted(self, notify: socket.socket, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            notify.settimeout(left)
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                break
        raise AssertionError(f"the container never booted: {self.log.read_text()[-3000:]}")

    def _find_leader(self, timeout: float) -> int:
        """The container's PID 1, seen from the host: nspawn's child that runs systemd."""
        deadline = time.monotonic() + timeout
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        while time.monotonic() < deadline:
            for pid in children.read_text().split() if children.exists() else []:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the container did not boot: {self.log.read_text()[-3000:]}")

    def run(self, *argv: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            ["nsenter", "--target", str(self.leader), "--all", *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}\n{result.stderr}")
        return result.stdout

    def ctl(self, *argv: str, timeout: float = 300) -> str:
        return self.run(str(QLINKCTL), *argv, timeout=timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.ctl("status", "-o", "json"))
        return {row["node"]: row for row in rows}

    def close(self) -> None:
        """SIGKILL of the container's PID 1 ends every process of its PID namespace, QEMU
        included, whatever state the test left it in."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.leader, signal.SIGKILL)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def container(guest_files: GuestFiles) -> Iterator[tuple[Container, Path]]:
    if shutil.which("systemd-nspawn") is None:
        pytest.fail("systemd-nspawn is missing: scripts/setup installs systemd-container")
    root = systemd_root()
    work = Path(tempfile.mkdtemp(prefix="qlink-systemd-", dir="/tmp"))
    box = Container(root, [REPO, guest_files.kernel.parent, work], work / "container.log")
    try:
        yield box, work
    finally:
        box.close()
        shutil.rmtree(work, ignore_errors=True)


def unit(box: Container) -> dict[str, str]:
    shown = box.run("systemctl", "show", "qlinkd", "-p", "Type,ActiveState,SubState,MainPID")
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def alive(box: Container, pids: dict[str, int]) -> dict[str, bool]:
    """Whether each PID is a live process in the container (a zombie counts as gone)."""
    states = {}
    for node, pid in pids.items():
        stat = box.run("cat", f"/proc/{pid}/stat", check=False)
        states[node] = bool(stat) and stat.rpartition(")")[2].split()[0] != "Z"
    return states


def test_qlinkd_as_a_systemd_service(
    container: tuple[Container, Path], guest_files: GuestFiles
) -> None:
    box, work = container
    assert box.run("cat", "/proc/1/comm").strip() == "systemd"
    box.run(str(REPO / "scripts" / "install-service"))
    box.run("systemctl", "start", "qlinkd", timeout=60)
    started = unit(box)
    # Type=notify: `systemctl start` returned once qlinkd said READY=1
    assert (started["Type"], started["ActiveState"], started["SubState"]) == (
        "notify", "active", "running",
    ), started  # fmt: skip

    lab = work / "pair.yaml"
    lab.write_text(
        f"""\
name: pair
defaults:
  memory: 256
  accel: tcg
  kernel: {guest_files.kernel}
  initrd: {guest_files.initrd}
  ready: {{console: "qlink-ready name="}}
nodes:
  r1: {{append: "console=ttyS0 qlink.name=r1"}}
  r2: {{append: "console=ttyS0 qlink.name=r2"}}
links:
  - [r1:eth1, r2:eth1]
"""
    )
    box.ctl("up", str(lab), "--wait", "--timeout", "180")
    before = box.status()
    pids = {node: int(row["pid"]) for node, row in before.items()}
    assert all(row["ready"] for row in before.values()), before

    box.run("systemctl", "restart", "qlinkd", timeout=60)
    restarted = unit(box)
    assert restarted["ActiveState"] == "active", restarted
    assert restarted["MainPID"] != started["MainPID"]
    after_restart = box.status()
    assert {node: int(row["pid"]) for node, row in after_restart.items()} == pids
    assert all(row["state"] == "running" for row in after_restart.values()), after_restart

    box.run("systemctl", "stop", "qlinkd", timeout=60)
    assert unit(box)["ActiveState"] == "inactive"
    assert all(alive(box, pids).values()), "a VM died with the service"
    box.run("systemctl", "start", "qlinkd", timeout=60)
    after_stop = box.status()
    assert {node: int(row["pid"]) for node, row in after_stop.items()} == pids
    assert all(row["state"] == "running" for row in after_stop.values()), after_stop

    records = [
        json.loads(line)
        for line in box.run("journalctl", "-u", "qlinkd", "-o", "json", "--no-pager").splitlines()
    ]
    by_node = [record for record in records if record.get("NODE") == "r1"]
    assert by_node, f"no journal record has NODE=r1 among {len(records)}"
    assert all(record.get("LAB") == "pair" for record in by_node)
    assert any("adopt" in record.get("MESSAGE", "") for record in by_node), [
        record.get("MESSAGE") for record in by_node
    ]

    box.ctl("down", "pair")
    assert not any(alive(box, pids).values()), "down left a VM running"
