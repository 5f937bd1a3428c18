"""The service unit: what keeps VMs alive across `systemctl restart qlinkd`, checked by systemd."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require

TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "qlinkd.service.in"


def rendered(tmp_path: Path) -> Path:
    unit = tmp_path / "qlinkd.service"
    unit.write_text(
        TEMPLATE.read_text().replace("@QLINKD@", "/usr/bin/true").replace("@DOCS@", "/dev/null")
    )
    return unit


def service_section(unit: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(unit)
    return parser["Service"]


def test_unit_keeps_vms_alive_and_notifies(tmp_path: Path) -> None:
    service = service_section(rendered(tmp_path))
    assert service["Type"] == "notify"
    assert service["KillMode"] == "process"  # only qlinkd is signalled, never the VMs
    assert service["RuntimeDirectoryPreserve"] == "yes"  # the VMs' sockets live there
    assert service["Restart"] == "on-failure"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze is not installed (apt-get install systemd)")
    assert analyze is not None
    result = subprocess.run(
        [analyze, "verify", str(rendered(tmp_path))],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "qlinkd.service" not in result.stderr, result.stderr


@pytest.mark.parametrize("placeholder", ["@QLINKD@", "@DOCS@"])
def test_install_script_fills_every_placeholder(placeholder: str) -> None:
    script = (TEMPLATE.parent.parent / "scripts" / "install-service").read_text()
    assert placeholder in script
