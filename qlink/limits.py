"""QEMU 7.2's hard limits on what a node may ask for, and the checks of a node against them.

Checked while validating the file, so that a file asking for more fails at its line instead
of at launch. The host's own limits (its RAM, KVM's vCPU count) are the host probe's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlink.yamlload import Location

if TYPE_CHECKING:  # for annotations only: topology.py imports this module
    from qlink.topology import NodeSettings

Q35_MAX_CPUS = 288
"""q35's max_cpus (hw/i386/pc_q35.c); QEMU 7.2 says "The max CPUs supported by machine
'pc-q35-7.2' is 288"."""
Q35_2_7_MAX_CPUS = 255
"""pc-q35-2.7 and older kept 255."""
TCG_MAX_CPUS = 255
"""Past 255 vCPUs APIC ids need KVM's in-kernel irqchip with x2APIC; under TCG, QEMU 7.2 says
"current -smp configuration requires kernel irqchip and X2APIC API support"."""
DEFAULT_PHYS_BITS = 40
"""The guest-physical address bits QEMU gives a CPU unless it passes the host's through:
TCG's (TCG_PHYS_ADDR_BITS) and KVM's for named models, so 1 TiB of address space in which RAM
must fit along with the 32-bit and 64-bit PCI holes: QEMU 7.2 under TCG starts 978 GiB of RAM
and refuses 979 GiB ("phys-bits too low (40)")."""
MAX_PHYS_BITS = 52
"""x86-64's architectural limit, 4 PiB: the most `cpu: host` (the host's phys-bits) can have."""


def beyond_qemu(
    name: str, settings: NodeSettings, merged: NodeSettings
) -> Iterator[tuple[Location, str]]:
    """A node's cpus and memory past what QEMU 7.2 can give any guest, blamed where set."""

    def where(field: str) -> Location:
        return (
            ("nodes", name, field) if getattr(settings, field) is not None else ("defaults", field)
        )

    # Merged over BUILTIN_DEFAULTS, which sets all three.
    assert merged.cpus is not None
    assert merged.memory is not None
    assert merged.machine is not None
    max_cpus, why = _max_cpus(merged.machine, merged.accel)
    if merged.cpus > max_cpus:
        yield where("cpus"), f"{merged.cpus} vCPUs: {why} takes at most {max_cpus}"
    bits = _phys_bits(merged.accel, merged.cpu)
    limit_mib = 1 << (bits - 20)
    # RAM cannot fill the whole address space: the PCI holes below 4 GiB and above RAM take
    # part of it, so even the limit itself is too much.
    if merged.memory >= limit_mib:
        origin = (
            "QEMU's default phys-bits for this CPU and accelerator"
            if bits == DEFAULT_PHYS_BITS
            else "set by the CPU's phys-bits"
            if bits != MAX_PHYS_BITS
            else "the most an x86-64 CPU addresses"
        )
        yield (
            where("memory"),
            (
                f"{merged.memory} MiB of RAM does not fit in the guest's {bits}-bit physical "
                f"address space ({_binary_size(limit_mib)} = {limit_mib} MiB, {origin})"
            ),
        )


def _binary_size(mib: int) -> str:
    for unit, shift in (("PiB", 30), ("TiB", 20), ("GiB", 10)):
        if mib >= 1 << shift:
            return f"{mib >> shift} {unit}"
    return f"{mib} MiB"


def _max_cpus(machine: str, accel: str | None) -> tuple[int, str]:
    version = re.fullmatch(r"pc-q35-(\d+)\.(\d+)", machine)
    if version is not None and (int(version.group(1)), int(version.group(2))) <= (2, 7):
        return Q35_2_7_MAX_CPUS, f"QEMU's {machine}"
    if accel == "tcg":
        return TCG_MAX_CPUS, "QEMU 7.2 under TCG (no x2APIC)"
    return Q35_MAX_CPUS, "QEMU 7.2's q35"


def _phys_bits(accel: str | None, cpu: str | None) -> int:
    """The guest-physical address bits QEMU gives this CPU, as far as the file tells.

    `host` and `max` under KVM pass the host's phys-bits through (host-phys-bits), which only
    the host knows: up to x86-64's 52. `accel: auto` may turn out to be KVM, so it gets the
    benefit of the doubt; the host probe compares memory with the host's RAM.
    """
    model, *flags = (cpu or "").split(",")
    for flag in flags:
        key, _, value = flag.partition("=")
        if key == "phys-bits" and value.isdigit():
            return min(max(int(value), 32), MAX_PHYS_BITS)
        if key.lstrip("+") == "host-phys-bits" and value in ("", "on", "true", "yes"):
            return MAX_PHYS_BITS
    if accel == "tcg":
        return DEFAULT_PHYS_BITS
    # qlink writes `-cpu host` under KVM when the file names no model.
    return MAX_PHYS_BITS if model in ("", "host", "max") else DEFAULT_PHYS_BITS


@dataclass(frozen=True, slots=True)
class HostResources:
    """What this host can give a VM, for `validate` and `up` to check a file against
    (`host.host_resources` reads them; tests pass their own)."""

    memory_mib: int
    cpus: int
    image_problem: Callable[[str], str | None]
    """Why a disk image cannot back a node's overlay (unreadable, not an image, a backing
    file missing), or None when it can."""


def beyond_host(
    name: str, settings: NodeSettings, merged: NodeSettings, image: str | None, host: HostResources
) -> Iterator[tuple[Location, str]]:
    """A node asking for more than this host has, blamed where it was set; `image` is the
    node's image path as resolved against the file's folder."""

    def where(field: str) -> Location:
        return (
            ("nodes", name, field) if getattr(settings, field) is not None else ("defaults", field)
        )

    assert merged.cpus is not None
    assert merged.memory is not None
    if merged.memory > host.memory_mib:
        yield (
            where("memory"),
            (
                f"{merged.memory} MiB of RAM is more than this host has ({host.memory_mib} MiB): "
                "QEMU would start and the host would swap or kill it"
            ),
        )
    if merged.cpus > host.cpus:
        yield (
            where("cpus"),
            (
                f"{merged.cpus} vCPUs is more than this host's {host.cpus} CPU threads: each vCPU "
                "is a thread, and more than the host runs at once only slows every guest"
            ),
        )
    if image is not None and (problem := host.image_problem(image)):
        yield where("image"), f"image {image}: {problem}"
