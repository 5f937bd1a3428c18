"""The one place that probes the host: the QEMU binary, its version, and whether KVM works."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import structlog

from qlink.errors import HostError
from qlink.plan.argv import HostFacts

log = structlog.get_logger(__name__)

DEFAULT_QEMU = "qemu-system-x86_64"

# A 64 KiB firmware whose reset vector writes 0x31 to port 0xf4 and halts. With
# isa-debug-exit there, QEMU exits with (0x31 << 1) | 1 = 99 once the vCPU has run it.
_PROBE_EXIT_STATUS = 99
_PROBE_CODE = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])  # mov al,0x31; out 0xf4,al; hlt


def _probe_firmware() -> bytes:
    image = bytearray(b"\xf4" * 65536)
    image[-16 : -16 + len(_PROBE_CODE)] = _PROBE_CODE
    return bytes(image)


@dataclass(frozen=True, slots=True)
class KvmVerdict:
    usable: bool
    reason: str


def find_qemu(binary: str | None = None) -> str:
    """The QEMU binary's full path; `QLINK_QEMU` overrides the default name."""
    wanted = binary or os.environ.get("QLINK_QEMU") or DEFAULT_QEMU
    found = shutil.which(wanted)
    if found is None:
        raise HostError(f"{wanted} not found: install it (Debian: apt-get install qemu-system-x86)")
    return found


def qemu_version(binary: str) -> str:
    result = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return result.stdout.splitlines()[0] if result.stdout else "unknown"


def probe_kvm(binary: str, timeout: float = 5.0) -> KvmVerdict:
    """Whether a guest really runs under KVM here, not merely whether /dev/kvm opens.

    Nested or half-broken KVM is common on lab hosts: /dev/kvm exists, yet guests hang or
    QEMU asserts. So the probe boots a vCPU under KVM, with the CPU model a lab node gets
    (`host`), and requires it to execute code and exit through isa-debug-exit. On a host
    whose KVM cannot set the MSRs of that model, QEMU asserts here exactly as it would
    under a real guest.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is missing or not accessible")
    with tempfile.NamedTemporaryFile(prefix="qlink-kvm-probe-", suffix=".bin") as firmware:
        firmware.write(_probe_firmware())
        firmware.flush()
        argv = [
            binary, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-nodefaults",
            "-no-user-config", "-display", "none", "-m", "16M", "-bios", firmware.name,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return KvmVerdict(False, f"a KVM vCPU did not run the probe within {timeout:g} s")
    if result.returncode != _PROBE_EXIT_STATUS:
        first_line = (result.stderr.strip().splitlines() or ["no message"])[0]
        return KvmVerdict(False, f"KVM probe exited {result.returncode}: {first_line}")
    return KvmVerdict(True, "a KVM vCPU ran the probe")


@cache
def probe_host(binary: str | None = None) -> HostFacts:
    """Host facts for the argv, probed once per process."""
    qemu = find_qemu(binary)
    verdict = probe_kvm(qemu)
    log.info("host_probed", qemu=qemu, kvm_usable=verdict.usable, kvm_reason=verdict.reason)
    return HostFacts(qemu_binary=qemu, kvm_usable=verdict.usable)


def describe_host_without_qemu() -> HostFacts:
    """Facts to plan with when QEMU is not installed: the default binary name, and TCG."""
    return HostFacts(qemu_binary=DEFAULT_QEMU, kvm_usable=False)


def missing_files(paths: list[str]) -> list[str]:
    return [path for path in paths if not Path(path).is_file()]
