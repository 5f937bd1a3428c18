"""The screen of a node's `extra_args`: QEMU options qlink does not own pass, the rest do not.

qlink appends `extra_args` to the argv it writes, so they reach QEMU's own option parser
(`lookup_opt` in QEMU 7.2's softmmu/vl.c), and the screen reads them exactly as it does:

- an item that starts with '-' names an option, `--name` being the same as `-name`; the name
  must match exactly, so `-rtc=base=utc` is no option at all;
- an option that takes a value takes the next item, whatever it starts with;
- any other item where an option should be is a disk image (`-hda ITEM`).

Each option then gets a verdict. Refused are the options that would take something qlink owns
away from it: a value qlink writes (a second `-machine` merges with qlink's), control of the
process (`-daemonize`, another monitor, a debugger), its links (every netdev is a link), its
ids (`qmp`, `console`, `nic-*`...) and PCI slots, or that qlink cannot see into
(`-readconfig`). The screen does not protect the host from the topology's author, who may
name any host file already (`kernel:`); the control socket's permissions are that boundary.

`-S` passes on purpose: a VM paused before its first instruction is still under qlink's QMP,
which can resume it, and qlink's own tests and benchmarks use one to get a VM without a guest.

The option table is QEMU 7.2's (qlink's target, Debian 12's QEMU); an option this table does
not know is refused, since the screen could not tell whether it takes the next item.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

QEMU_VERSION = "7.2"

# qemu-system-x86_64 7.2's options, from the option table compiled into the binary
# (tests/data/qemu-7.2-options.txt holds it with each option's target mask).
_TAKES_VALUE = frozenset((
    "machine", "M", "cpu", "accel", "smp", "numa", "add-fd", "set", "global", "boot", "m",
    "mem-path", "k", "audio", "audiodev", "device", "name", "uuid", "fda", "fdb", "hda", "hdb",
    "hdc", "hdd", "cdrom", "blockdev", "drive", "mtdblock", "sd", "fsdev", "virtfs", "iscsi",
    "usbdevice", "display", "spice", "rotate", "vga", "vnc", "acpitable", "smbios", "netdev",
    "nic", "net", "chardev", "tpmdev", "bios", "pflash", "kernel", "append", "initrd", "dtb",
    "compat", "fw_cfg", "serial", "parallel", "monitor", "qmp", "qmp-pretty", "mon", "debugcon",
    "pidfile", "overcommit", "gdb", "d", "D", "dfilter", "seed", "L", "xen-domid", "action",
    "loadvm", "option-rom", "rtc", "icount", "watchdog-action", "echr", "incoming", "chroot",
    "runas", "sandbox", "readconfig", "trace", "plugin", "qtest", "qtest-log", "msg",
    "dump-vmstate", "object",
))  # fmt: skip
_FLAGS = frozenset((
    "h", "help", "version", "mem-prealloc", "audio-help", "snapshot", "usb", "nographic",
    "portrait", "full-screen", "win2k-hack", "no-fd-bootchk", "no-acpi", "no-hpet", "singlestep",
    "preconfig", "S", "s", "enable-kvm", "xen-attach", "xen-domid-restrict", "no-reboot",
    "no-shutdown", "daemonize", "only-migratable", "nodefaults", "no-user-config",
    "async-teardown", "enable-sync-profile",
))  # fmt: skip
# In QEMU's table, but for other targets: qemu-system-x86_64 exits on them. Whether each takes
# a value still decides how the items after it are read.
OTHER_TARGET_OPTIONS: Mapping[str, bool] = {
    "g": True, "prom-env": True, "semihosting": False, "semihosting-config": True,
    "old-param": False,
}  # fmt: skip

QEMU_OPTIONS: Mapping[str, bool] = {
    **dict.fromkeys(_TAKES_VALUE, True),
    **dict.fromkeys(_FLAGS, False),
}
"""Every option qemu-system-x86_64 7.2 runs, and whether it takes the next item as its value."""

# --- what qlink owns, mirrored from qlink/plan (a test checks that they agree) --------------

# Exact ids in qlink's argv: the QMP and console chardevs, the boot disk (device id and block
# node name), the management NIC's netdev and device.
_QLINK_IDS = frozenset({"qmp", "console", "disk0", "mgmt", "nic-mgmt", "seed", "seed-disk"})
# Id families: `net-IF` netdevs, `nic-IF` devices (IF is any interface name), `qlink-brN`
# bridges, and `qlink*`/`mgmt*` kept for what qlink adds next.
_QLINK_ID_PREFIXES = ("net-", "nic-", "qlink", "mgmt")

ROOT_BUS = "pcie.0"
# pcie.0 slots qlink places devices at: 0x01 management NIC, 0x02 boot disk, 0x03-0x1e its
# PCI bridges (qlink/plan/identity.py). A device put there by hand takes a place qlink needs,
# now or when the node grows a bridge; a device without `addr` gets a free slot after qlink's.
QLINK_ROOT_SLOTS = range(0x01, 0x1E + 1)

# Every QOM type an option `-global DRIVER.PROP=VALUE` would reach in qlink's devices: QEMU
# applies a global to every device whose type is DRIVER or derives from it or implements it
# (object_dynamic_cast), so `pci-device` reaches every NIC. Read from QEMU 7.2 with
# `qom-list-types` for the NIC models, virtio-blk-pci, pci-bridge, pvpanic and the guest
# agent's virtio-serial-pci and virtserialport.
_QLINK_DEVICE_TYPES = frozenset((
    "virtio-net-pci", "virtio-net-pci-base", "virtio-net-device", "e1000", "e1000-base",
    "e1000e", "rtl8139", "vmxnet3", "virtio-blk-pci", "virtio-blk-pci-base", "virtio-blk-device",
    "virtio-pci", "virtio-device", "pci-bridge", "base-pci-bridge", "pvpanic", "pci-device",
    "isa-device", "device", "object", "conventional-pci-device", "pci-express-device",
    "hotplug-handler", "acpi-dev-aml-interface", "resettable", "vmstate-if",
    "virtio-serial-pci", "virtio-serial-pci-base", "virtio-serial-device", "virtserialport",
    "virtio-serial-port",
))  # fmt: skip
# Properties qlink relies on whatever device carries them: NIC hotplug behind its bridges is
# ACPI's (q35's ICH9-LPC).
_QLINK_GLOBAL_PROPERTIES = frozenset({"acpi-pci-hotplug-with-bridge-support"})

# QemuOpts groups of the options qlink writes (`-set GROUP.ID.PROP=VALUE` edits them).
_QLINK_GROUPS = frozenset(
    {"name", "machine", "accel", "smp-opts", "memory", "msg", "mon", "action", "netdev", "net",
     "nic"}
)  # fmt: skip

# -object types that cannot reach a link, a monitor or the host beyond QEMU's own process.
OBJECT_ALLOW_LIST: Mapping[str, str] = {
    "rng-builtin": "entropy for virtio-rng",
    "rng-random": "entropy for virtio-rng",
    "rng-egd": "entropy for virtio-rng",
    "memory-backend-ram": "guest RAM for -numa and memory devices",
    "memory-backend-file": "guest RAM for -numa and memory devices",
    "memory-backend-memfd": "guest RAM for -numa and memory devices",
    "iothread": "disk I/O threads",
    "thread-context": "where memory preallocation threads run",
    "throttle-group": "disk I/O limits",
    "secret": "credentials for disks and TLS",
    "secret_keyring": "credentials for disks and TLS",
    "tls-creds-anon": "TLS for the user's chardevs and disks",
    "tls-creds-psk": "TLS for the user's chardevs and disks",
    "tls-creds-x509": "TLS for the user's chardevs and disks",
    "tls-cipher-suites": "TLS for the user's chardevs and disks",
    "authz-list": "TLS client authorization",
    "authz-list-file": "TLS client authorization",
    "authz-simple": "TLS client authorization",
    "cryptodev-backend-builtin": "virtio-crypto in QEMU's process",
}
_OBJECT_REFUSALS: Mapping[str, str] = {
    "filter-": "a netfilter sits on a netdev, and every netdev is one of qlink's links: it could "
    "drop, redirect or replay the link's frames",
    "colo-compare": "it takes over the frames of netdevs, and every netdev is one of qlink's links",
    "qtest": "the qtest protocol drives the VM from outside, like a monitor",
    "dbus-": "it exports the VM on D-Bus, a control channel qlink does not own",
    "x-remote-object": "it serves a device to another QEMU process",
    "input-": "it reads a host input device or input server",
}

# Options qlink writes itself: one more would override or merge with qlink's.
OWNED_OPTIONS: Mapping[str, str] = {
    "name": "qlink names the VM after its node",
    "nodefaults": "qlink starts QEMU without default devices",
    "no-user-config": "qlink starts QEMU without its config files",
    "display": "qlink runs every VM headless; its console is the serial port",
    "machine": "qlink writes -machine from the `machine` field",
    "accel": "qlink picks the accelerator from the `accel` field",
    "cpu": "qlink writes -cpu from the `cpu` field",
    "smp": "qlink writes -smp from the `cpus` field",
    "m": "qlink writes -m from the `memory` field",
    "kernel": "use the `kernel` field",
    "initrd": "use the `initrd` field",
    "append": "use the `append` field",
    "msg": "qlink sets the format of QEMU's messages in its log",
    "pidfile": "qlink's pidfile is how it re-adopts a running VM",
    "serial": "serial port 0 is qlink's console, and -serial can carry a monitor (mon:); add a "
    "port with -device isa-serial,chardev=ID",
    "netdev": "every netdev is one of qlink's links: one made by hand bypasses qlink's UDP port "
    "allocation and checks (a port bound twice silently steals frames)",
    "mon": "qlink's QMP socket is the VM's only monitor: another would control it behind "
    "qlink's back",
    "action": "qlink decides what a guest panic does (the process exits, and qlink sees it), "
    "and its restart policy what a reboot or a power-off does",
}
# Other spellings of those: QEMU turns each into the option it stands for.
OWNED_ALIASES: Mapping[str, str] = {
    "M": "machine",
    "nographic": "display",
    "enable-kvm": "accel",
    "nic": "netdev",
    "net": "netdev",
    "monitor": "mon",
    "qmp": "mon",
    "qmp-pretty": "mon",
    "watchdog-action": "action",
    "no-reboot": "action",
    "no-shutdown": "action",
}
# Options that would take the process, the VM's control or the host's ports from qlink.
REFUSED_OPTIONS: Mapping[str, str] = {
    "daemonize": "QEMU would fork away from the process qlink watches, whose exit qlink acts on",
    "chroot": "QEMU would lose the sockets and files qlink gave it",
    "runas": "QEMU would lose the sockets and files qlink gave it",
    "readconfig": "qlink cannot see inside a config file, which can add monitors, netdevs and "
    "chardevs",
    "add-fd": "QEMU inherits no descriptors from qlink but its stdio and log, which -add-fd "
    "would hand to the guest's devices",
    "incoming": "QEMU would wait for a migration stream instead of booting, and qlink never "
    "sends one",
    "preconfig": "QEMU would stop before creating the machine and wait for a QMP command qlink "
    "never sends",
    "gdb": "a debugger stub stops the VM behind qlink's back",
    "s": "a debugger stub stops the VM behind qlink's back, and -s listens on TCP port 1234 "
    "for every VM",
    "qtest": "the qtest protocol drives the VM from outside, like a monitor",
    "qtest-log": "the qtest protocol drives the VM from outside, like a monitor",
    "plugin": "it loads a shared library into QEMU's process",
    "compat": "it changes what QMP accepts and answers, which qlink's QMP client relies on",
    "vnc": "it opens a remote display on a host TCP port that qlink neither allocates nor protects",
    "spice": "it opens a remote display on a host TCP port that qlink neither allocates nor "
    "protects",
    "no-acpi": "qlink hot-plugs NICs behind its PCI bridges through ACPI",
    "xen-domid": "it needs the Xen accelerator; qlink runs kvm or tcg",
    "xen-attach": "it needs the Xen accelerator; qlink runs kvm or tcg",
    "xen-domid-restrict": "it needs the Xen accelerator; qlink runs kvm or tcg",
    "h": "QEMU would print its help and exit instead of running the VM",
    "help": "QEMU would print its help and exit instead of running the VM",
    "version": "QEMU would print its version and exit instead of running the VM",
    "audio-help": "QEMU would print its help and exit instead of running the VM",
    "dump-vmstate": "QEMU would write the file and exit instead of running the VM",
}

_HELP_WORDS = frozenset({"help", "?"})
# Option properties that name another object by id: pointing one at qlink's is taking it over.
_REFERENCE_KEYS = frozenset(
    {"chardev", "drive", "file", "backing", "data-file", "memdev", "iothread", "bus"}
)
_ID_KEYS = frozenset({"id", "node-name"})
_GLOBAL_SHORT = re.compile(r"([^.=]{1,63})\.([^=]{1,63})=")
_PCI_ADDR = re.compile(r"(?:0[xX])?([0-9a-fA-F]+)(?:\.(?:0[xX])?[0-9a-fA-F]+)?")


def is_qlink_id(value: str) -> bool:
    """Whether `value` is an id (chardev, netdev, device, block node) qlink uses or reserves."""
    return value in _QLINK_IDS or value.startswith(_QLINK_ID_PREFIXES)


def option_name(item: str) -> str | None:
    """The option an argv item names as QEMU reads it (`--rtc` is `-rtc`), or None."""
    if not item.startswith("-"):
        return None
    return item[2:] if item.startswith("--") else item[1:]


def screen_extra_args(args: Sequence[str]) -> list[tuple[int, str]]:
    """Every refusal in `args`, as (index of the item to blame, what is wrong and why).

    `args` is read as QEMU reads it after qlink's own options; an empty list means it passes.
    """
    refusals: list[tuple[int, str]] = []
    index = 0
    while index < len(args):
        item = args[index]
        name = option_name(item)
        if name is None:
            refusals.append(
                (index, f"{item!r} is not an option: QEMU would open it as a disk image "
                        "(-hda); put it after the option it belongs to")
            )  # fmt: skip
            index += 1
            continue
        takes_value = QEMU_OPTIONS.get(name, OTHER_TARGET_OPTIONS.get(name))
        if takes_value is None:
            refusals.append((index, _unknown(item, name)))
            # Whether it takes a value is unknown: the next item is read as an option.
            index += 1
            continue
        value: str | None = None
        if takes_value:
            if index + 1 >= len(args):
                refusals.append((index, f"{item} takes a value, and nothing follows it"))
                break
            value = args[index + 1]
        reason = _verdict(name, value)
        if reason is not None:
            shown = item if value is None else f"{item} {_shorten(value)}"
            refusals.append((index, f"{shown}: {reason}"))
        index += 1 if value is None else 2
    return refusals


def _unknown(item: str, name: str) -> str:
    head = re.split(r"[=\s]", name, maxsplit=1)[0]
    if head != name and head in QEMU_OPTIONS:
        return (
            f"{item!r}: QEMU takes an option and its value as two items; "
            f"write -{head} and its value separately"
        )
    return f"{item} is not an option of QEMU {QEMU_VERSION}'s qemu-system-x86_64"


def _shorten(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _verdict(name: str, value: str | None) -> str | None:
    """Why the option `name` with `value` is refused, or None if it passes."""
    if name in OTHER_TARGET_OPTIONS:
        return "not available on qemu-system-x86_64 (QEMU refuses it for this target)"
    if name in OWNED_OPTIONS:
        return f"an option qlink writes itself: {OWNED_OPTIONS[name]}"
    if name in OWNED_ALIASES:
        owned = OWNED_ALIASES[name]
        return f"QEMU reads it as -{owned}, an option qlink writes itself: {OWNED_OPTIONS[owned]}"
    if name in REFUSED_OPTIONS:
        return REFUSED_OPTIONS[name]
    if value is None:
        return None
    if any(part in _HELP_WORDS for part in _split_opts(value)):
        return "it asks QEMU for help, and QEMU would print it and exit instead of running the VM"
    props = _props(value)
    if props is None:
        return "not valid JSON, so qlink cannot see what it asks for"
    check = _VALUE_CHECKS.get(name)
    return (check(value) if check is not None else None) or _check_props(props)


# --- reading option values --------------------------------------------------------------


def _split_opts(value: str) -> list[str]:
    """QemuOpts' comma-separated items, a doubled comma being a literal one."""
    return [part.replace("\0", ",") for part in value.replace(",,", "\0").split(",")]


def _props(value: str, implied: str = "") -> list[tuple[str, str]] | None:
    """An option value as (key, value) pairs: JSON (`{...}`, which -device, -object and
    -blockdev take), or QemuOpts/keyval text whose first bare item is the `implied` key.
    Nested JSON keys are dotted, as keyval writes them (`file.node-name`). None if the JSON
    is not valid."""
    if value.startswith("{"):
        try:
            document = json.loads(value)
        except ValueError:
            return None
        return list(_flatten(document, "")) if isinstance(document, dict) else None
    pairs = []
    for position, part in enumerate(_split_opts(value)):
        key, sep, item = part.partition("=")
        if sep:
            pairs.append((key, item))
        elif position == 0 and implied:
            pairs.append((implied, key))
    return pairs


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from _flatten(item, f"{prefix}{position}.")
    elif isinstance(value, bool):
        yield prefix[:-1], "on" if value else "off"
    else:
        yield prefix[:-1], str(value)


def _check_props(props: Sequence[tuple[str, str]]) -> str | None:
    for key, value in props:
        last = key.rsplit(".", 1)[-1]
        if last == "netdev":
            return (
                f"{key}={value}: every netdev is one of qlink's links, "
                "so no device of the user's may take one"
            )
        if last in _ID_KEYS and is_qlink_id(value):
            return f"{key}={value}: qlink uses that id (or keeps its family for itself)"
        if last in _REFERENCE_KEYS and is_qlink_id(value):
            return f"{key}={value} refers to one of qlink's own: it may not be taken over"
    return None


def _slot(addr: str | None) -> int | None:
    """The slot of a PCI `addr` written as text: hex `slot[.function]`, as QEMU reads it."""
    match = _PCI_ADDR.fullmatch(addr) if addr is not None else None
    return int(match.group(1), 16) if match else None


def _slot_message(slot: int) -> str:
    return (
        f"{ROOT_BUS} slot {slot:#x} is qlink's (0x1 management NIC, 0x2 boot disk, 0x3-0x1e its "
        "PCI bridges): leave addr out and QEMU picks a free slot"
    )


# --- options that pass, with rules on their value ------------------------------------------


def _check_device(value: str) -> str | None:
    if value.startswith("{"):
        try:
            document = json.loads(value)
        except ValueError:
            return None  # reported by the generic check
        if not isinstance(document, dict):
            return None
        driver = str(document.get("driver", ""))
        # A JSON number is a devfn: slot << 3 | function.
        addr = document.get("addr")
        slot = (
            addr >> 3 if isinstance(addr, int) else _slot(addr if isinstance(addr, str) else None)
        )
        bus = document.get("bus")
    else:
        props = dict(_props(value, implied="driver") or ())
        driver = props.get("driver", "")
        slot = _slot(props.get("addr"))
        bus = props.get("bus")
    if driver == "pvpanic":
        return "qlink adds pvpanic itself: a guest panic must end the process"
    # Without `bus`, a PCI device goes on the root bus.
    if slot is not None and bus in (None, ROOT_BUS) and slot in QLINK_ROOT_SLOTS:
        return _slot_message(slot)
    return None


def _check_object(value: str) -> str | None:
    props = _props(value, implied="qom-type")
    kind = dict(props or ()).get("qom-type", "")
    if kind in OBJECT_ALLOW_LIST:
        return None
    for prefix, reason in _OBJECT_REFUSALS.items():
        if kind.startswith(prefix):
            return f"{kind}: {reason}"
    return (
        f"{kind or 'an object without qom-type'} is not on qlink's allow-list of objects "
        f"({', '.join(sorted(OBJECT_ALLOW_LIST))})"
    )


def _check_set(value: str) -> str | None:
    target, sep, prop_value = value.partition("=")
    parts = target.split(".", 2)
    if not sep or len(parts) != 3:
        return "-set takes GROUP.ID.PROPERTY=VALUE"
    group, ident, prop = parts
    if group in _QLINK_GROUPS:
        return f"the {group} options are qlink's, and -set would change them"
    if is_qlink_id(ident):
        return f"{group} {ident} is qlink's, and -set would change it"
    return _check_props([(prop, prop_value)])


def _check_global(value: str) -> str | None:
    short = _GLOBAL_SHORT.match(value)
    if short is not None:
        driver, prop = short.group(1), short.group(2)
    else:
        props = dict(_props(value) or ())
        driver, prop = props.get("driver", ""), props.get("property", "")
    if not driver or not prop:
        return "-global takes DRIVER.PROPERTY=VALUE (or driver=,property=,value=)"
    if driver in _QLINK_DEVICE_TYPES:
        return (
            f"a global on {driver} reaches qlink's own devices (NICs, bridges, boot disk, "
            "pvpanic), whose properties qlink sets"
        )
    if prop in _QLINK_GLOBAL_PROPERTIES:
        return f"{prop}: qlink hot-plugs NICs behind its PCI bridges through ACPI"
    return None


def _check_chardev_spec(value: str) -> str | None:
    # -parallel and -debugcon take a chardev spec: `mon:` multiplexes a monitor onto it.
    if value.startswith("mon:"):
        return "mon: adds a monitor, and qlink's QMP socket is the VM's only one"
    backend, _, name = value.partition(":")
    if backend == "chardev" and is_qlink_id(name):
        return f"chardev {name} is qlink's"
    return None


def _check_smbios(value: str) -> str | None:
    if dict(_props(value) or ()).get("type") == "11":
        return (
            "qlink writes the type 11 OEM strings (root's SSH key as a systemd credential), "
            "which another type 11 table could override"
        )
    return None


_VALUE_CHECKS: Mapping[str, Callable[[str], str | None]] = {
    "device": _check_device,
    "object": _check_object,
    "set": _check_set,
    "global": _check_global,
    "parallel": _check_chardev_spec,
    "debugcon": _check_chardev_spec,
    "smbios": _check_smbios,
}
