"""Which QMP commands the passthrough (`POST /v1/nodes/NODE/qmp`, `qlinkctl qmp`) runs, and
for whom.

QEMU runs as qlinkd's user, root on a real host, and QMP can make it do whatever that user
can: `migrate` to an `exec:` URI runs a shell command, `screendump` and `dump-guest-memory`
write any host file, `human-monitor-command` reaches all of HMP, a tap `netdev_add` runs a
host script, `chardev-add` and `object-add` open host files and sockets. The control socket
is mode 0660 so that a group can be given access to it; a passthrough that ran anything would
make every member of that group root. So, first match wins:

1. OWNED: a command that would take the VM out of qlink's hands (`quit`, unplugging qlink's
   own NICs, removing its QMP monitor) is refused to everyone, root included, with the
   qlinkctl verb that does it properly. Root can still do anything by hand; this only keeps
   the passthrough from being the easy way to confuse the supervisor.
2. OPEN: read-only and lab-operating commands, which any caller may run.
3. Everything else is for a privileged caller only: root, or qlinkd's own user (who gains
   nothing through QEMU that they do not have already). The caller is the peer of the unix
   socket connection (SO_PEERCRED, `qlink/api/peer.py`); one that cannot be identified is
   not privileged.

The lists below are by name, never by pattern, except the read-only `query-` prefixes: a
command QEMU adds in a later version is root-only until someone decides otherwise here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from qlink.errors import Forbidden

OPEN_PREFIXES: Mapping[str, str] = {
    "query-": "read-only by QEMU's own convention: it reports, it never changes the VM",
    "x-query-": "experimental read-only reports (x-query-roms, x-query-virtio, ...)",
}

OPEN: Mapping[str, str] = {
    "qom-get": "reads one QOM property",
    "qom-list": "lists a QOM object's children and properties",
    "qom-list-types": "lists the types this QEMU knows",
    "qom-list-properties": "lists a type's properties",
    "device-list-properties": "lists a device type's properties",
    "trace-event-get-state": "reads whether trace events are on",
    "set_link": "a NIC's carrier, as `qlinkctl link` sets it: the lab's own cable, no more",
    "system_reset": "a reset inside the same QEMU process: the guest reboots, no restart",
    "system_powerdown": "the ACPI power button, as `qlinkctl stop` starts: the guest decides, "
    "and its power-off is handled as any guest's own",
    "system_wakeup": "wakes a suspended guest",
    "stop": "pauses the vCPUs (a hung node, on purpose); QMP still answers, supervision goes on",
    "cont": "resumes paused vCPUs",
    "send-key": "keystrokes to the guest, which `qlinkctl console` gives this group already",
    "input-send-event": "keyboard and mouse input to the guest, as send-key",
    "inject-nmi": "an NMI to the guest, a debugging aid that stays inside the guest",
}

ROOT_ONLY: Mapping[str, str] = {
    "human-monitor-command": "HMP reaches every monitor command, the root-only ones included",
    "migrate": "an exec: URI runs a shell command",
    "migrate-incoming": "an exec: URI runs a shell command",
    "migrate-set-parameters": "it prepares a migration (see migrate)",
    "migrate-set-capabilities": "it prepares a migration (see migrate)",
    "dump-guest-memory": "it writes the guest's memory to a host file",
    "screendump": "it writes an image to any host path",
    "memsave": "it writes guest memory to a host file",
    "pmemsave": "it writes guest memory to a host file",
    "device_add": "it plugs any device, host backends included",
    "device_del": "it can unplug devices the lab relies on (and every id is QEMU-wide)",
    "netdev_add": "a tap netdev runs a host script; a socket one can bind another link's port",
    "netdev_del": "it can cut a backend qlink does not know of",
    "chardev-add": "file and socket backends open host paths",
    "chardev-remove": "it can remove a backend in use",
    "object-add": "memory-backend-file, filter-dump and others open host files",
    "object-del": "it can remove objects in use",
    "qom-set": "it rewrites any property, qlink's NICs included",
    "add-fd": "it passes host file descriptors to QEMU",
    "getfd": "it passes host file descriptors to QEMU",
    "closefd": "it closes QEMU's file descriptors",
    "balloon": "harmless to the host, but not needed to operate a lab (qlink adds no balloon)",
    "trace-event-set-state": "tracing can fill the host disk through QEMU's log",
}
"""The notable ones, with the reason a refusal gives; `quit` is refused to everyone (below)."""

ROOT_ONLY_PREFIXES: Mapping[str, str] = {
    "blockdev-": "block nodes open, write and mirror host files",
    "block-": "block jobs and block devices write host files",
    "drive-": "drive jobs write host files",
    "x-": "experimental commands, unreviewed",
}

# qlink's own ids, as `plan/argv.py`, `plan/lab.py`, `plan/identity.py` and
# `daemon/core.py` (captures) name them; tests/test_api_hardening.py checks every id of every
# golden plan against these.
_OWNED_IDS: tuple[tuple[str, str, re.Pattern[str], str], ...] = (
    (
        "device_del",
        "id",
        re.compile(r"nic-.+|qlink-br\d+|disk0|seed-disk|qlink-agent-serial"),
        "a NIC, bridge, disk or guest agent channel of qlink",
    ),
    ("netdev_del", "id", re.compile(r"net-.+|mgmt"), "the backend of a NIC of qlink"),
    (
        "chardev-remove",
        "id",
        re.compile(r"qmp|console|qlink-agent"),
        "qlink's QMP monitor, serial console or guest agent channel",
    ),
    ("object-del", "id", re.compile(r"qlink-capture-\d+"), "the filter of a running capture"),
    ("blockdev-del", "node-name", re.compile(r"disk0"), "the node's boot disk"),
)
"""(command, its argument naming the target, qlink's ids, what such an id is)"""

_INSTEAD_OF_OWNED: Mapping[str, str] = {
    "device_del": "cut a cable with `qlinkctl link down NODE:IF`; to remove a link, edit the "
    "lab file and run `qlinkctl up FILE` (it unplugs the NIC and keeps the identity of the rest)",
    "netdev_del": "cut a cable with `qlinkctl link down NODE:IF`",
    "chardev-remove": "qlinkd needs them; `qlinkctl console` and `logs` are the way in",
    "object-del": "end the `qlinkctl capture` (Ctrl-C); qlinkd removes its filter",
    "blockdev-del": "stop the node with `qlinkctl stop NODE`",
}


class QmpRefused(Forbidden):
    """The passthrough will not run this QMP command for this caller: why, and what instead."""

    def __init__(self, command: str, reason: str, instead: str) -> None:
        self.command = command
        self.reason = reason
        self.instead = instead
        super().__init__(f"QMP {command} refused: {reason}")


def check_qmp(
    node: str,
    command: str,
    arguments: Mapping[str, Any],
    caller_uid: int | None,
    daemon_uid: int,
) -> None:
    """Return if `caller_uid` may run `command` on `node` through qlinkd; else QmpRefused."""
    _refuse_owned(node, command, arguments)
    if is_open(command) or caller_uid in (0, daemon_uid):
        return
    who = "a caller qlinkd cannot identify" if caller_uid is None else f"uid {caller_uid}"
    qemu_user = "root" if daemon_uid == 0 else f"uid {daemon_uid}"
    raise QmpRefused(
        command,
        f"it is for root only, and this is {who}: {root_only_reason(command)}; QEMU runs as "
        f"{qemu_user}, so whoever may run it is {qemu_user} on this host",
        "run it as root (sudo qlinkctl qmp ...). Anyone on the control socket may run "
        "query-*, x-query-*, " + ", ".join(OPEN),
    )


def is_open(command: str) -> bool:
    return command in OPEN or command.startswith(tuple(OPEN_PREFIXES))


def root_only_reason(command: str) -> str:
    if command in ROOT_ONLY:
        return ROOT_ONLY[command]
    prefix = next((prefix for prefix in ROOT_ONLY_PREFIXES if command.startswith(prefix)), None)
    if prefix is not None:
        return ROOT_ONLY_PREFIXES[prefix]
    return "it is not one of the read-only or lab-operating commands open to everyone"


def _refuse_owned(node: str, command: str, arguments: Mapping[str, Any]) -> None:
    if command == "quit":
        raise QmpRefused(
            command,
            "it ends the VM behind its supervisor's back, which would handle the exit as the "
            "guest's own (and restart it, or not, by its policy)",
            f"stop it with `qlinkctl stop {node}` (or replace its QEMU: `qlinkctl restart {node}`)",
        )
    for name, key, owned, what in _OWNED_IDS:
        target = arguments.get(key)
        if command != name or not isinstance(target, str):
            continue
        # device_del also takes a QOM path (/machine/peripheral/ID): judge its last part.
        if owned.fullmatch(target.rsplit("/", 1)[-1]):
            raise QmpRefused(
                command,
                f"{target!r} is {what}, and qlinkd keeps track of it",
                _INSTEAD_OF_OWNED[name].replace("NODE", node),
            )
