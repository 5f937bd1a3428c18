"""The plan: pure functions from a validated lab to ports, MACs, PCI places, paths and argv.

Nothing in this package touches the host, so `qlinkctl plan` and the golden tests need none.
"""

from qlink.plan.allocations import Allocations
from qlink.plan.argv import HostFacts, build_argv, qemu_opts
from qlink.plan.lab import LabPlan, LinkPlan, MgmtPlan, NicPlan, NodePlan, plan_lab
from qlink.plan.paths import Layout, NodePaths

__all__ = [
    "Allocations",
    "HostFacts",
    "LabPlan",
    "Layout",
    "LinkPlan",
    "MgmtPlan",
    "NicPlan",
    "NodePaths",
    "NodePlan",
    "build_argv",
    "plan_lab",
    "qemu_opts",
]
