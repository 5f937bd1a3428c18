"""The KVM probe's firmware layout and verdict logic, without running QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlink import host, kvm_probe


def test_firmware_is_a_bios_image_whose_reset_vector_jumps_into_it() -> None:
    image = kvm_probe.firmware()
    assert len(image) == kvm_probe.FIRMWARE_SIZE
    # F000:FFF0 is the last 16 bytes: a far jump (EA ofs16 seg16) to F000:0200.
    assert image[0xFFF0:0xFFF5] == bytes([0xEA, 0x00, 0x02, 0x00, 0xF0])


def test_a_probe_that_ran_64_bit_code_is_usable() -> None:
    verdict = kvm_probe.judge(kvm_probe.EXPECTED_EXIT_STATUS, "RPL", "", 5.0, "host")
    assert verdict.usable
    assert "long mode" in verdict.reason


@pytest.mark.parametrize(
    ("returncode", "stages", "stderr", "says"),
    [
        # The hang of a nested KVM: the vCPU never leaves real mode, as Linux never does.
        (None, "R", "", "did not finish the probe within 5 s: it reached real mode"),
        (None, "", "", "ran no instruction of the probe"),
        (None, "RP", "", "reached protected mode and went no further"),
        # QEMU aborts on an MSR the host refuses: the message is QEMU's own.
        (-6, "", "qemu: error: failed to set MSR 0x10a to 0x69\nassert", "MSR 0x10a"),
        # A triple fault with -no-reboot: QEMU exits 0, which is not the probe's status.
        (0, "RP", "", "exited 0"),
        # The right status without the long-mode stage is not trusted either.
        (kvm_probe.EXPECTED_EXIT_STATUS, "RP", "", "reached protected mode"),
    ],
)
def test_every_other_outcome_is_refused_with_its_reason(
    returncode: int | None, stages: str, stderr: str, says: str
) -> None:
    verdict = kvm_probe.judge(returncode, stages, stderr, 5.0, "host")
    assert not verdict.usable
    assert says in verdict.reason


def _fake_probe(calls: list[str], usable: bool) -> object:
    def probe(binary: str, timeout: float = 5.0, cpu_model: str = "host") -> kvm_probe.KvmVerdict:
        calls.append(binary)
        return kvm_probe.KvmVerdict(usable, "fake")

    return probe


def test_the_verdict_is_cached_per_qemu_binary_and_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second report reads the cache; a QEMU that changed on disk is probed again."""
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.0'\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("QLINK_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[str] = []
    monkeypatch.setattr(host, "probe_kvm", _fake_probe(calls, usable=True))

    first = host.host_report(str(qemu))
    second = host.host_report(str(qemu))
    assert (first.cached, second.cached) == (False, True)
    assert second.kvm_usable
    assert second.qemu_version == "QEMU emulator version 7.2.0"
    assert len(calls) == 1

    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 8.0.0'\n")  # an upgrade
    third = host.host_report(str(qemu))
    assert not third.cached
    assert third.qemu_version.endswith("8.0.0")
    assert len(calls) == 2

    cached = json.loads((tmp_path / "cache" / "host.json").read_text())
    cached["key"]["boot_id"] = "another-boot"  # as after a reboot into another kernel
    (tmp_path / "cache" / "host.json").write_text(json.dumps(cached))
    assert not host.host_report(str(qemu)).cached
    assert host.host_report(str(qemu), refresh=True).cached is False
    assert len(calls) == 4


def test_a_damaged_cache_means_a_new_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\necho v\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("QLINK_CACHE_DIR", str(tmp_path))
    (tmp_path / "host.json").write_text("{not json")
    calls: list[str] = []
    monkeypatch.setattr(host, "probe_kvm", _fake_probe(calls, usable=False))
    report = host.host_report(str(qemu))
    assert not report.cached
    assert not report.kvm_usable
    assert calls == [str(qemu)]
