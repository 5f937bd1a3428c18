"""Hardening findings that need real QEMU: a QEMU that refuses its command line is reported
in its own words, and `validate` checks a file against this host (its memory, its images)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import GuestFiles, Qlinkd, write_lab

pytestmark = pytest.mark.qemu

FAST = ("--backoff-initial", "0.1", "--backoff-attempts", "2", "--powerdown-timeout", "0")


def test_a_crash_loop_reports_qemus_own_words(
    qlinkd: Callable[..., Qlinkd], short_root: Path, guest_files: GuestFiles
) -> None:
    """A QEMU that exits in 50 ms (an unknown device) was reported by `up` as "QEMU did not
    become ready within 30 s": it makes its chardevs (so QMP listens) before its devices."""
    daemon = qlinkd(*FAST)
    lab = write_lab(
        short_root,
        f"""\
        name: crash
        defaults: {{memory: 64, accel: tcg, kernel: {guest_files.kernel}}}
        nodes:
          a: {{extra_args: [-device, no-such-device-model]}}
        """,
    )
    started = time.monotonic()
    result = daemon.ctl("up", str(lab))
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "QEMU exited with status 1 during start-up" in result.stderr, result.stderr
    assert "'no-such-device-model' is not a valid device model name" in result.stderr
    assert "did not become ready" not in result.stderr
    assert elapsed < 10, f"up took {elapsed:.1f} s to give up"
    table = daemon.ctl("status").stdout
    assert "crash/a is failed: QEMU exited with status 1 during start-up" in table
    assert "no-such-device-model" in table


def test_validate_checks_the_file_against_this_host(short_root: Path, qemu_binary: str) -> None:
    corrupt = short_root / "corrupt.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(corrupt), "64M"], check=True)
    with corrupt.open("r+b") as image:
        image.seek(40)  # the L1 table's offset: garbage
        image.write(b"\xff" * 8)
    lab = write_lab(
        short_root,
        f"""\
        name: big
        defaults: {{accel: kvm}}
        nodes:
          a: {{image: {corrupt}}}
          b:
            kernel: /bin/true
            memory: 100000000
        """,
    )
    result = subprocess.run(
        [sys.executable, "-m", "qlink.cli", "validate", str(lab)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{lab}:4: nodes.a.image: image {corrupt}: Could not open")
    assert "Active L1 table offset invalid" in lines[0]
    assert lines[1].startswith(f"{lab}:7: nodes.b.memory: 100000000 MiB of RAM is more than")


def test_a_paused_vm_is_stopped_without_waiting_for_acpi(
    qlinkd: Callable[..., Qlinkd], short_root: Path, guest_files: GuestFiles
) -> None:
    """A paused guest cannot answer an ACPI power-down: `down` of 20 paused VMs waited out
    the power-down timeout (30 s). The ladder now asks QEMU whether the vCPUs run first."""
    daemon = qlinkd("--powerdown-timeout", "30")
    lab = write_lab(
        short_root,
        f"""\
        name: paused
        defaults: {{memory: 64, accel: tcg, kernel: {guest_files.kernel}, extra_args: [-S]}}
        nodes: {{a: {{}}, b: {{}}}}
        """,
    )
    daemon.ctl_ok("up", str(lab))
    daemon.ctl_ok("stop", "a")
    assert daemon.status()["paused/a"]["last_exit"] == "stopped by quit"
    daemon.ctl_ok("down", "paused")


def test_a_stopped_qemu_is_replaced_within_seconds(
    qlinkd: Callable[..., Qlinkd], short_root: Path, guest_files: GuestFiles
) -> None:
    """SIGSTOP took 66 s to be noticed (a QMP probe every 30 s, two misses): /proc tells at
    once, and costs nothing between the probes."""
    daemon = qlinkd(*FAST)  # the default liveness: QMP every 30 s
    lab = write_lab(
        short_root,
        f"""\
        name: stop
        defaults: {{memory: 64, accel: tcg, kernel: {guest_files.kernel}, extra_args: [-S]}}
        nodes: {{a: {{}}}}
        """,
    )
    daemon.ctl_ok("up", str(lab))
    pid = daemon.status()["stop/a"]["pid"]
    with daemon.events() as events:
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        backoff = events.until(lambda e: e.get("state") == "backoff" and e["node"] == "a", 20)
        noticed = time.monotonic() - started
        back = events.until(lambda e: e.get("state") == "running" and e["node"] == "a", 30)
    assert noticed < 10, f"a stopped QEMU was noticed after {noticed:.1f} s"
    assert back["pid"] != pid
    assert "stopped (SIGSTOP)" in backoff["last_error"]
