"""The one place that probes the host: the QEMU binary, its version, and whether KVM works."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import structlog

from qlink import kvm_probe
from qlink.errors import HostError
from qlink.kvm_probe import KvmVerdict
from qlink.limits import HostResources
from qlink.plan.argv import HostFacts

log = structlog.get_logger(__name__)

DEFAULT_QEMU = "qemu-system-x86_64"


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


PROBE_MACHINE = "q35"
PROBE_CPU = "host"
"""What an `accel: auto` node gets under KVM (`plan/argv.py`): the probe must run the same."""
PROBE_TIMEOUT = 5.0
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """`QLINK_CACHE_DIR`, else /var/cache/qlink for root, else ~/.cache/qlink."""
    chosen = os.environ.get("QLINK_CACHE_DIR")
    if chosen:
        return Path(chosen)
    if os.geteuid() == 0:
        return Path("/var/cache/qlink")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlink"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_argv(
    binary: str, firmware: Path, stages: Path, cpu_model: str, accel: str = "kvm"
) -> list[str]:
    """The probe's QEMU command line; tests run the same firmware under TCG."""
    return [
        binary,
        "-accel", accel,
        "-machine", PROBE_MACHINE,
        "-cpu", cpu_model,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        # A triple fault must end the probe, not reset into it again.
        "-no-reboot",
        "-m", "16M",
        "-bios", str(firmware),
        "-debugcon", f"file:{stages}",
        "-device", f"isa-debug-exit,iobase={kvm_probe.DEBUG_EXIT_PORT:#x},iosize=0x04",
    ]  # fmt: skip


def probe_kvm(
    binary: str, timeout: float = PROBE_TIMEOUT, cpu_model: str = PROBE_CPU
) -> KvmVerdict:
    """Whether a guest kernel really runs under KVM here, not merely whether /dev/kvm opens:
    the firmware of `kvm_probe` takes a vCPU from real mode into long mode, under the
    machine type and CPU model a node gets."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is missing or not accessible")
    with tempfile.TemporaryDirectory(prefix="qlink-kvm-probe-") as scratch:
        firmware, stages = Path(scratch) / "probe.bin", Path(scratch) / "stages"
        firmware.write_bytes(kvm_probe.firmware())
        argv = probe_argv(binary, firmware, stages, cpu_model)
        returncode: int | None
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
            returncode, stderr = result.returncode, result.stderr
        except subprocess.TimeoutExpired as expired:
            returncode = None
            stderr = expired.stderr.decode(errors="replace") if expired.stderr else ""
        reached = stages.read_text(errors="replace") if stages.exists() else ""
    return kvm_probe.judge(returncode, reached, stderr, timeout, cpu_model)


@dataclass(frozen=True, slots=True)
class HostReport:
    """What `qlinkctl host` shows: the facts the argv uses, and why KVM is or is not used."""

    qemu_binary: str
    qemu_version: str
    kernel: str
    boot_id: str
    kvm_usable: bool
    kvm_reason: str
    probe_seconds: float
    probed_at: float
    cached: bool

    @property
    def facts(self) -> HostFacts:
        return HostFacts(qemu_binary=self.qemu_binary, kvm_usable=self.kvm_usable)

    def as_dict(self) -> dict[str, object]:
        return {
            "qemu": self.qemu_binary,
            "qemu_version": self.qemu_version,
            "kernel": self.kernel,
            "boot_id": self.boot_id,
            "kvm_usable": self.kvm_usable,
            "kvm_reason": self.kvm_reason,
            "accel_auto": "kvm" if self.kvm_usable else "tcg",
            "probe_machine": PROBE_MACHINE,
            "probe_cpu": PROBE_CPU,
            "probe_seconds": round(self.probe_seconds, 3),
            "probed_at": self.probed_at,
            "cached": self.cached,
        }


def _cache_key(qemu: str, boot_id: str) -> dict[str, object]:
    """A new QEMU (path, inode, size or mtime), a reboot into another kernel, or another
    probe makes the cached verdict stale."""
    stat = os.stat(qemu)
    return {
        "version": _CACHE_VERSION,
        "qemu": qemu,
        "qemu_file": [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns],
        "boot_id": boot_id,
        "machine": PROBE_MACHINE,
        "cpu": PROBE_CPU,
        "firmware": hashlib.sha256(kvm_probe.firmware()).hexdigest()[:16],
    }


def _read_cache(path: Path, key: dict[str, object]) -> HostReport | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("key") != key:
            return None
        return HostReport(**document["report"], cached=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing, unreadable or from another version: probe again


def _write_cache(path: Path, key: dict[str, object], report: HostReport) -> None:
    stored = dataclasses.asdict(report)
    del stored["cached"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({"key": key, "report": stored}, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as error:  # a read-only cache costs a probe next time, nothing more
        log.warning("host_cache_not_written", path=str(path), error=str(error))


def host_report(binary: str | None = None, refresh: bool = False) -> HostReport:
    """The host's facts, from the cache when nothing they depend on changed."""
    qemu = find_qemu(binary)
    boot_id = _boot_id()
    key = _cache_key(qemu, boot_id)
    path = cache_dir() / "host.json"
    if not refresh and (cached := _read_cache(path, key)) is not None:
        return cached
    started = time.monotonic()
    verdict = probe_kvm(qemu)
    report = HostReport(
        qemu_binary=qemu,
        qemu_version=qemu_version(qemu),
        kernel=os.uname().release,
        boot_id=boot_id,
        kvm_usable=verdict.usable,
        kvm_reason=verdict.reason,
        probe_seconds=time.monotonic() - started,
        probed_at=time.time(),
        cached=False,
    )
    _write_cache(path, key, report)
    log.info("host_probed", qemu=qemu, kvm_usable=verdict.usable, kvm_reason=verdict.reason,
             seconds=round(report.probe_seconds, 3))  # fmt: skip
    return report


@cache
def probe_host(binary: str | None = None) -> HostFacts:
    """Host facts for the argv, probed once per process and cached per host."""
    return host_report(binary).facts


def describe_host_without_qemu() -> HostFacts:
    """Facts to plan with when QEMU is not installed: the default binary name, and TCG."""
    return HostFacts(qemu_binary=DEFAULT_QEMU, kvm_usable=False)


def missing_files(paths: list[str]) -> list[str]:
    return [path for path in paths if not Path(path).is_file()]


def host_memory_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise HostError("/proc/meminfo has no MemTotal line")


def image_problem(path: str) -> str | None:
    """Why `path` cannot back a qcow2 overlay, in qemu-img's words; None when it can (or when
    qemu-img is not installed to tell: the launch says so then)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None or not Path(path).is_file():
        return None  # a missing file is reported as such, by the file check
    try:
        result = subprocess.run(
            [qemu_img, "info", "--output=json", "--backing-chain", "-U", path],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "qemu-img info did not answer within 30 s"
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return (
            lines[-1].removeprefix("qemu-img: ")
            if lines
            else f"qemu-img exited {result.returncode}"
        )
    try:
        chain = json.loads(result.stdout)
    except ValueError:
        return "qemu-img info gave no JSON"
    top = chain[0] if isinstance(chain, list) and chain else {}
    if not isinstance(top, dict) or not isinstance(top.get("format"), str):
        return "qemu-img could not tell its format"
    return None


def host_resources() -> HostResources:
    """This host's memory, CPU threads and an image check, for `validate` and `up`."""
    cpus = len(os.sched_getaffinity(0))
    return HostResources(memory_mib=host_memory_mib(), cpus=cpus, image_problem=image_problem)
