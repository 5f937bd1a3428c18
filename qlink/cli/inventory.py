"""What a running lab gives other tools: an Ansible inventory and an ssh_config, both made
from `status` rows (each node's SSH forward) and qlinkd's key. Pure functions of the rows;
the stdlib alone, like every daemon verb (`tests/test_client.py`)."""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_GROUP_CHARS = re.compile(r"[^A-Za-z0-9_]")
SSH_OPTIONS = {
    # Lab VMs are rebuilt all the time: their host keys change, so none is remembered.
    "StrictHostKeyChecking": "no",
    "UserKnownHostsFile": "/dev/null",
    "LogLevel": "ERROR",
}


def group_name(text: str) -> str:
    """An Ansible group name (letters, digits, `_`; no leading digit) from a lab, kind or
    stage name: `cumulus-vx` -> `cumulus_vx`, `oob-mgmt` -> `oob_mgmt`, 45 -> `stage_45`."""
    name = _GROUP_CHARS.sub("_", text)
    return f"stage_{name}" if name[:1].isdigit() else name


def hosts_of(rows: list[dict[str, Any]], lab: str | None) -> dict[str, dict[str, Any]]:
    """{inventory host name: its status row} for every node with an SSH forward; a node
    name that two labs both use is written LAB-NODE."""
    rows = [row for row in rows if row.get("ssh") and lab in (None, row["lab"])]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["node"]] = counts.get(row["node"], 0) + 1
    return {
        (row["node"] if counts[row["node"]] == 1 else f"{row['lab']}-{row['node']}"): row
        for row in rows
    }


def _hostvars(row: dict[str, Any], key: str | None, user: str) -> dict[str, Any]:
    address, _, port = str(row["ssh"]).rpartition(":")
    found: dict[str, Any] = {"ansible_host": address, "ansible_port": int(port),
                             "ansible_user": user}  # fmt: skip
    if key is not None:
        found["ansible_ssh_private_key_file"] = key
    found["ansible_ssh_common_args"] = " ".join(f"-o {k}={v}" for k, v in SSH_OPTIONS.items())
    found["qlink_lab"] = row["lab"]
    for field in ("kind", "stage"):
        if row.get(field) is not None:
            found[f"qlink_{field}"] = row[field]
    return found


def groups_of(hosts: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """{group: hosts}: one group per lab, per kind and per stage."""
    groups: dict[str, list[str]] = {}
    for host, row in hosts.items():
        names = [row["lab"], *(str(row[f]) for f in ("kind", "stage") if row.get(f) is not None)]
        for name in names:
            groups.setdefault(group_name(name), []).append(host)
    return dict(sorted(groups.items()))


def inventory_json(hosts: dict[str, dict[str, Any]], key: str | None, user: str) -> str:
    """The `--list` form a dynamic inventory prints (`ansible-inventory -i SCRIPT`)."""
    groups = groups_of(hosts)
    document: dict[str, Any] = {
        "_meta": {"hostvars": {host: _hostvars(row, key, user) for host, row in hosts.items()}},
        "all": {"children": ["ungrouped", *groups]},
        "ungrouped": {"hosts": []},
    }
    document |= {group: {"hosts": members} for group, members in groups.items()}
    return json.dumps(document, indent=2) + "\n"


def inventory_yaml(hosts: dict[str, dict[str, Any]], key: str | None, user: str) -> str:
    """Ansible's YAML inventory; every scalar written as JSON, which YAML reads."""
    lines = ["all:", "  hosts:"]
    for host, row in hosts.items():
        lines.append(f"    {json.dumps(host)}:")
        lines += [f"      {k}: {json.dumps(v)}" for k, v in _hostvars(row, key, user).items()]
    groups = groups_of(hosts)
    if groups:
        lines.append("  children:")
    for group, members in groups.items():
        lines += [f"    {group}:", "      hosts:"]
        lines += [f"        {json.dumps(host)}: {{}}" for host in members]
    return "\n".join(lines) + "\n"


def inventory_ini(hosts: dict[str, dict[str, Any]], key: str | None, user: str) -> str:
    """Ansible's INI inventory: hosts with their variables, then one section per group."""
    lines = []
    for host, row in hosts.items():
        pairs = " ".join(f"{k}={_ini_value(v)}" for k, v in _hostvars(row, key, user).items())
        lines.append(f"{host} {pairs}")
    for group, members in groups_of(hosts).items():
        lines += ["", f"[{group}]", *members]
    return "\n".join(lines) + "\n"


def _ini_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(char in text for char in " '\"#;=") else text


def ssh_config(hosts: dict[str, dict[str, Any]], key: str | None, user: str) -> str:
    """One `Host` block per node: `ssh -F <(qlinkctl ssh-config) leaf01`."""
    blocks = []
    for host, row in hosts.items():
        address, _, port = str(row["ssh"]).rpartition(":")
        lines = [f"Host {host}", f"  HostName {address}", f"  Port {port}", f"  User {user}"]
        if key is not None:
            lines.append(f"  IdentityFile {key}")
        lines += [f"  {option} {value}" for option, value in SSH_OPTIONS.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
