"""The QEMU command line of a node: a pure function of its plan and a few host facts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlink.plan.identity import DISK_SLOT, MGMT_SLOT, ROOT_BUS, bridge_id, bridge_place
from qlink.plan.lab import NicPlan, NodePlan
from qlink.topology import ResolvedAccel

OptionValue = str | int | bool


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the argv needs to know about the host; `host.probe_host` finds them out."""

    qemu_binary: str = "qemu-system-x86_64"
    kvm_usable: bool = False

    def accel_for(self, requested: str) -> ResolvedAccel:
        if requested == "kvm":
            return "kvm"
        if requested == "tcg":
            return "tcg"
        return "kvm" if self.kvm_usable else "tcg"


def render_value(value: OptionValue) -> str:
    """One QemuOpts value: booleans as on/off, and commas doubled, QEMU's escape for them."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def qemu_opts(head: str | None = None, /, **options: OptionValue) -> str:
    """`head,key=value,...` with every value escaped.

    Keys are QEMU's own property names, verbatim; the ones with a dash or a dot are passed
    as `**{"debug-threads": True}`.
    """
    parts = [render_value(head)] if head is not None else []
    parts += [f"{key}={render_value(value)}" for key, value in options.items()]
    return ",".join(parts)


def build_argv(plan: NodePlan, host: HostFacts) -> list[str]:
    """The exact argv of `plan`'s QEMU, one option and its value per line."""
    node = plan.node
    paths = plan.paths
    accel = host.accel_for(node.accel)
    cpu = node.cpu or ("host" if accel == "kvm" else "max")
    argv = [
        host.qemu_binary,
        "-name", qemu_opts(guest=node.name, **{"debug-threads": True}),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", node.machine,
        "-accel", accel,
        "-cpu", cpu,
        "-smp", str(node.cpus),
        "-m", f"{node.memory}M",
        "-msg", qemu_opts(timestamp=True),
        "-pidfile", str(paths.pidfile),
        # QMP on a path, not an inherited fd, so a restarted qlinkd can reconnect to it.
        "-chardev", qemu_opts("socket", id="qmp", path=str(paths.qmp_socket), server=True,
                              wait=False),
        "-mon", qemu_opts(chardev="qmp", mode="control"),
        # The console log is written by QEMU itself, so it is kept whether or not anyone
        # is attached and survives qlinkd restarts.
        "-chardev", qemu_opts("socket", id="console", path=str(paths.console_socket),
                              server=True, wait=False, logfile=str(paths.console_log),
                              logappend=True),
        "-serial", "chardev:console",
        # With pvpanic a guest panic makes QEMU exit non-zero: the process exit stays the one
        # truth the supervisor watches, instead of a paused VM that looks alive.
        "-device", "pvpanic",
        "-action", qemu_opts(panic="exit-failure"),
        # The CPUs start stopped: qlinkd runs them once the QEMUs starting beside this one
        # have started, so none starts behind guests already booting (`runtime/hold.py`).
        *(["-S"] if plan.held else []),
    ]  # fmt: skip
    if node.kernel is not None:
        argv += ["-kernel", node.kernel]
        if node.initrd is not None:
            argv += ["-initrd", node.initrd]
        if node.append is not None:
            argv += ["-append", node.append]
    slot = disk_slot_places(plan)
    if "disk" in slot:
        argv += [
            "-blockdev", qemu_opts(driver="qcow2", **{"node-name": "disk0", "file.driver": "file",
                                   "file.filename": str(paths.overlay)}),
            "-device", qemu_opts("virtio-blk-pci", drive="disk0", id="disk0", bus=ROOT_BUS,
                                 addr=slot["disk"].pop("addr"), bootindex=0, **slot["disk"]),
        ]  # fmt: skip
    if "seed" in slot:
        # The NoCloud volume, read-only, as virtio-blk: the disk controller every cloud image
        # drives (Debian's cloud kernel has no AHCI, so an ide-cd stays invisible to it).
        argv += [
            "-drive", qemu_opts(**{"if": "none"}, id="seed", file=str(paths.seed), format="raw",
                                readonly=True),
            "-device", qemu_opts("virtio-blk-pci", drive="seed", id="seed-disk", bus=ROOT_BUS,
                                 **slot["seed"]),
        ]  # fmt: skip
    if "agent" in slot:
        # The guest agent's channel, by the name qemu-guest-agent's udev rule starts it on.
        argv += [
            "-chardev", qemu_opts("socket", id="qlink-agent", path=str(paths.agent_socket),
                                  server=True, wait=False),
            "-device", qemu_opts("virtio-serial-pci", id="qlink-agent-serial", bus=ROOT_BUS,
                                 **slot["agent"]),
            "-device", qemu_opts("virtserialport", bus="qlink-agent-serial.0",
                                 chardev="qlink-agent", name="org.qemu.guest_agent.0"),
        ]  # fmt: skip
    if plan.mgmt is not None:
        mgmt = plan.mgmt
        forward = f"tcp:{mgmt.host_address}:{mgmt.ssh_port}-:22"
        argv += [
            "-netdev", qemu_opts("user", id=mgmt.netdev_id, hostfwd=forward),
            "-device", qemu_opts(node.nic_model, netdev=mgmt.netdev_id, id=mgmt.device_id,
                                 mac=mgmt.mac, bus=ROOT_BUS, addr=f"{MGMT_SLOT:#x}"),
            # Root's authorized keys as a systemd credential in an OEM string: systemd >= 252
            # guests (Debian 12 and later) install it, as does the qlink test guest; any
            # other OS just sees one more SMBIOS string.
            "-smbios", qemu_opts(type=11, path=str(mgmt.ssh_credential)),
        ]  # fmt: skip
    for index in range(plan.bridges):
        place = bridge_place(index)
        argv += [
            "-device", qemu_opts("pci-bridge", id=bridge_id(index), bus=place.bus,
                                 addr=place.addr, chassis_nr=index + 1, shpc=False),
        ]  # fmt: skip
    for nic in plan.nics:
        netdev = nic_netdev_options(nic)
        device = nic_device_options(plan, nic)
        argv += [
            "-netdev", qemu_opts(str(netdev.pop("type")), **netdev),
            "-device", qemu_opts(str(device.pop("driver")), **device),
        ]  # fmt: skip
    argv += node.extra_args
    return argv


def disk_slot_places(plan: NodePlan) -> dict[str, dict[str, OptionValue]]:
    """Where the boot disk, the day-0 seed and the guest agent's channel sit: functions of the
    disk's slot, in that order, so that the NIC layout is the same whichever a node has, and
    adding one never moves another. The slot is multifunction only when it holds more than
    one (so that nothing else of a node without them changes)."""
    node = plan.node
    present = [
        name
        for name, wanted in (
            ("disk", node.kernel is None),
            ("seed", plan.seed is not None),
            ("agent", node.ready is not None and node.ready.agent),
        )
        if wanted
    ]
    places: dict[str, dict[str, OptionValue]] = {}
    for function, name in enumerate(present):
        address = f"{DISK_SLOT:#x}" if function == 0 else f"{DISK_SLOT:#x}.{function:#x}"
        places[name] = {"addr": address}
    if len(present) > 1:
        places[present[0]]["multifunction"] = True
    return places


def nic_netdev_options(nic: NicPlan) -> dict[str, OptionValue]:
    """A data NIC's backend on the command line: the socket qlink opened for it, found at a
    fixed descriptor number (`NicPlan.fd`).

    `dgram` with only `local.type=fd` makes QEMU 7.2 send() on the socket as it is, with no
    address of its own: the socket is connected to the peer, so the kernel delivers nothing
    but the peer's datagrams (see `runtime/links.py` for why not `-netdev socket,udp=`)."""
    return {
        "type": "dgram",
        "id": nic.netdev_id,
        "local.type": "fd",
        "local.str": nic.fd,
    }


def nic_netdev_arguments(nic: NicPlan, fd_name: str) -> dict[str, Any]:
    """The same backend for QMP `netdev_add`, plugged into a running VM: the socket is passed
    beforehand over QMP (`getfd`) under `fd_name`, which takes the place of the number."""
    return {
        "type": "dgram",
        "id": nic.netdev_id,
        "local": {"type": "fd", "str": fd_name},
    }


def nic_device_options(plan: NodePlan, nic: NicPlan) -> dict[str, OptionValue]:
    """A data NIC's device: the options of `-device` and the arguments of QMP `device_add`,
    so a NIC plugged into a running VM is the one its command line would have made."""
    return {
        "driver": plan.node.nic_model,
        "netdev": nic.netdev_id,
        "id": nic.device_id,
        "mac": nic.mac,
        "bus": nic.place.bus,
        "addr": nic.place.addr,
    }
