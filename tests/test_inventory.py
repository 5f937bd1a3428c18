"""`qlinkctl inventory` and `ssh-config` from status rows, read back by a real
`ansible-inventory --list` (ansible-core is a test dependency) and by `ssh -G`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qlink.cli.inventory import (
    group_name,
    hosts_of,
    inventory_ini,
    inventory_json,
    inventory_yaml,
    ssh_config,
)

ROWS: list[dict[str, Any]] = [
    {"lab": "fabric-1", "node": "spine01", "ssh": "127.0.0.1:2200", "kind": "cumulus-vx",
     "stage": "spine"},
    {"lab": "fabric-1", "node": "leaf01", "ssh": "127.0.0.1:2201", "kind": "cumulus-vx",
     "stage": "leaf"},
    {"lab": "fabric-1", "node": "server01", "ssh": "127.0.0.1:2202", "kind": "linux",
     "stage": 45},
    {"lab": "fabric-1", "node": "nomgmt", "ssh": None, "kind": None, "stage": None},
    {"lab": "other", "node": "leaf01", "ssh": "127.0.0.1:2210", "kind": None, "stage": None},
]  # fmt: skip
KEY = "/var/lib/qlink/ssh/id_ed25519"


def ansible_inventory() -> str:
    found = Path(sys.executable).parent / "ansible-inventory"
    if found.exists():
        return str(found)
    which = shutil.which("ansible-inventory")
    if which is None:
        if os.environ.get("CI"):
            pytest.fail("ansible-inventory is missing: pip install -e '.[test]'")
        pytest.skip("ansible-inventory is not installed (pip install -e '.[test]')")
    return which


def listed(source: Path) -> dict[str, Any]:
    """What Ansible itself makes of the inventory at `source`."""
    env = {
        **os.environ,
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(source.parent / "tmp"),
        "HOME": str(source.parent),
    }
    done = subprocess.run(
        [ansible_inventory(), "-i", str(source), "--list"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def check_listing(listing: dict[str, Any]) -> None:
    hostvars = listing["_meta"]["hostvars"]
    assert sorted(hostvars) == ["fabric-1-leaf01", "other-leaf01", "server01", "spine01"]
    spine = hostvars["spine01"]
    assert (spine["ansible_host"], spine["ansible_port"], spine["ansible_user"]) == (
        "127.0.0.1",
        2200,
        "root",
    )
    assert spine["ansible_ssh_private_key_file"] == KEY
    assert "StrictHostKeyChecking=no" in spine["ansible_ssh_common_args"]
    assert sorted(listing["cumulus_vx"]["hosts"]) == ["fabric-1-leaf01", "spine01"]
    assert listing["spine"]["hosts"] == ["spine01"]
    assert listing["stage_45"]["hosts"] == ["server01"]
    assert sorted(listing["fabric_1"]["hosts"]) == ["fabric-1-leaf01", "server01", "spine01"]


@pytest.mark.parametrize("form", ["ini", "yaml", "json"])
def test_ansible_reads_every_form(tmp_path: Path, form: str) -> None:
    hosts = hosts_of(ROWS, None)
    if form == "ini":
        source = tmp_path / "hosts.ini"
        source.write_text(inventory_ini(hosts, KEY, "root"))
    elif form == "yaml":
        source = tmp_path / "hosts.yaml"
        source.write_text(inventory_yaml(hosts, KEY, "root"))
    else:
        # The --list form is what a dynamic inventory prints: Ansible runs it as a script.
        data = tmp_path / "list.json"
        data.write_text(inventory_json(hosts, KEY, "root"))
        source = tmp_path / "inventory.sh"
        source.write_text(f"#!/bin/sh\ncat {data}\n")
        source.chmod(0o755)
    check_listing(listed(source))


def test_one_lab_and_no_key() -> None:
    hosts = hosts_of(ROWS, "other")
    assert list(hosts) == ["leaf01"]
    text = inventory_ini(hosts, None, "cumulus")
    assert "ansible_ssh_private_key_file" not in text
    assert "ansible_user=cumulus" in text


def test_group_names_are_ansible_safe() -> None:
    assert group_name("cumulus-vx") == "cumulus_vx"
    assert group_name("45") == "stage_45"


def test_ssh_reads_the_ssh_config(tmp_path: Path) -> None:
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("no ssh client")
    config = tmp_path / "config"
    config.write_text(ssh_config(hosts_of(ROWS, None), KEY, "root"))
    done = subprocess.run([ssh, "-G", "-F", str(config), "spine01"], capture_output=True,
                          text=True, check=True, timeout=30)  # fmt: skip
    settings = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert settings["hostname"] == "127.0.0.1"
    assert settings["port"] == "2200"
    assert settings["user"] == "root"
    assert settings["identityfile"] == KEY
    assert settings["stricthostkeychecking"] == "false"
