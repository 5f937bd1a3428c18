"""Links added to or removed from a running node, without restarting it.

Every data NIC sits behind a PCI bridge, where QEMU hot-plugs (see `identity`), so a node
whose new command line differs from its running one only in data NICs gets them unplugged
and plugged over QMP instead of a restart: its guest keeps running, and so do the links it
keeps. The plugged NIC is the one the new command line makes, at the same PCI place, so
the next restart of the node changes nothing the guest can see.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qlink.plan.argv import HostFacts, build_argv
from qlink.plan.lab import NicPlan, NodePlan


@dataclass(frozen=True, slots=True)
class NicReplug:
    """The NICs to take out of a running node, and those to put in, in that order."""

    unplug: tuple[NicPlan, ...]
    plug: tuple[NicPlan, ...]

    def describe(self) -> str:
        parts = [f"unplug {nic.interface} (to {nic.peer})" for nic in self.unplug]
        parts += [f"plug {nic.interface} (to {nic.peer})" for nic in self.plug]
        return ", ".join(parts)


def nic_replug(
    running: NodePlan, running_argv: list[str], wanted: NodePlan, host: HostFacts
) -> NicReplug | None:
    """How to turn the node `running` (whose QEMU runs `running_argv`) into `wanted` by NIC
    hotplug; None when it cannot be (anything else changed, or the PCI bridges needed did)
    or when there is nothing to do."""
    running_nics = {nic.interface: nic for nic in running.nics}
    wanted_nics = {nic.interface: nic for nic in wanted.nics}
    unplug = tuple(nic for nic in running.nics if wanted_nics.get(nic.interface) != nic)
    plug = tuple(nic for nic in wanted.nics if running_nics.get(nic.interface) != nic)
    if not unplug and not plug:
        return None
    # Everything but the data NICs must be what the running QEMU has: the wanted node with the
    # running NICs must give the running command line, bridges included.
    with_running_nics = dataclasses.replace(wanted, nics=running.nics)
    if build_argv(with_running_nics, host) != running_argv:
        return None
    return NicReplug(unplug, plug)
