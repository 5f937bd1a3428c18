"""The KVM probe against real QEMU: its firmware really reaches long mode (under TCG, which
works everywhere), and on this host its verdict agrees with a real guest kernel under KVM."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qlink import host, kvm_probe
from tests.conftest import GuestFiles, write_lab

pytestmark = pytest.mark.qemu

READY = b"qlink-ready name="


def test_the_firmware_enters_long_mode_and_exits_with_the_probe_status(qemu_binary: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        firmware, stages = Path(scratch) / "fw.bin", Path(scratch) / "stages"
        firmware.write_bytes(kvm_probe.firmware())
        argv = host.probe_argv(qemu_binary, firmware, stages, "max", accel="tcg")
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        elapsed = time.monotonic() - started
        reached = stages.read_text()
    assert (result.returncode, reached) == (kvm_probe.EXPECTED_EXIT_STATUS, "RPL"), result.stderr
    verdict = kvm_probe.judge(result.returncode, reached, result.stderr, 5.0, "max")
    assert verdict.usable, verdict.reason
    assert elapsed < 5.0


def _guest_reaches_ready(
    qemu: str, guest: GuestFiles, cpu_model: str, timeout: float
) -> tuple[bool, str]:
    """Boot the test guest under KVM with `cpu_model`: whether it printed its ready line."""
    argv = [
        qemu, "-accel", "kvm", "-machine", "q35", "-cpu", cpu_model, "-m", "256",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", "console=ttyS0 qlink.name=probe",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    output = b""
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while READY not in output and (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    break
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break  # QEMU exited (it aborts on an MSR a broken KVM refuses)
                output += chunk
    finally:
        process.kill()
        process.wait()
    return READY in output, output.decode(errors="replace")[-300:]


@pytest.mark.parametrize("cpu_model", ["host", "qemu64"])
def test_the_probe_fails_exactly_where_a_guest_kernel_fails(
    qemu_binary: str, guest_files: GuestFiles, cpu_model: str
) -> None:
    """The issue's host: `-cpu qemu64` under this nested KVM runs the old one-instruction
    probe but hangs every kernel after `Probing EDD`. Whatever KVM does here, the probe and
    a real guest must agree (on a host with working KVM both succeed)."""
    verdict = host.probe_kvm(qemu_binary, cpu_model=cpu_model)
    ready, tail = _guest_reaches_ready(qemu_binary, guest_files, cpu_model, timeout=20.0)
    assert ready == verdict.usable, f"probe: {verdict}; guest console ends with:\n{tail}"
    assert verdict.reason


def test_plan_of_an_auto_node_follows_the_verdict_and_prints_only_json(
    short_root: Path, guest_files: GuestFiles, qemu_binary: str
) -> None:
    lab = write_lab(
        short_root,
        f"""\
        name: auto
        defaults: {{kernel: {guest_files.kernel}}}
        nodes: {{r1: {{}}}}
        """,
    )
    environment = {**os.environ, "QLINK_CACHE_DIR": str(short_root / "cache")}
    ctl = [sys.executable, "-m", "qlink.cli", "--root", str(short_root)]
    planned = subprocess.run(
        [*ctl, "plan", str(lab), "-o", "json"],
        capture_output=True, text=True, check=True, env=environment, timeout=60,
    )  # fmt: skip
    argv = json.loads(planned.stdout)["nodes"]["r1"]["argv"]  # nothing but JSON on stdout
    assert "host_probed" in planned.stderr  # the first plan probed, and said so on stderr
    reported = subprocess.run(
        [*ctl, "host", "-o", "json"],
        capture_output=True, text=True, check=True, env=environment, timeout=60,
    )  # fmt: skip
    facts = json.loads(reported.stdout)
    assert facts["cached"] is True
    assert argv[argv.index("-accel") + 1] == facts["accel_auto"]
    assert facts["accel_auto"] == ("kvm" if host.probe_kvm(qemu_binary).usable else "tcg")
    text = subprocess.run(
        [*ctl, "host"], capture_output=True, text=True, check=True, env=environment, timeout=60
    ).stdout
    assert f"accel: auto  {facts['accel_auto']}" in text
    assert facts["kvm_reason"] in text
