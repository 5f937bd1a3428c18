"""`qlinkctl wait` and `up --wait`: until nodes are ready, or cannot get there; and `up`'s
boot order, which starts a node once the nodes it waits for are ready."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from qlink.bootorder import waves
from qlink.daemon.labs import Labs
from qlink.daemon.views import is_ready, not_ready_because
from qlink.errors import Conflict
from qlink.policy import VmStatus
from qlink.states import IDLE
from qlink.supervisor import VmSupervisor


async def wait_ready(labs: Labs, references: list[str], timeout: float) -> dict[str, str]:
    """Until every named node (every node of every lab, when none is named) is ready;
    returns the ones that are not, with why, once `timeout` passed or none of them can
    get there any more (failed or stopped)."""
    targets = (
        [labs.find_node(reference) for reference in references]
        if references
        else [(lab, supervisor) for lab in labs for supervisor in lab.supervisors.values()]
    )
    waits = [supervisor.wait_for(_ready_or_idle(supervisor)) for _, supervisor in targets]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*waits)
    return {
        f"{lab.name}/{supervisor.name}": not_ready_because(supervisor)
        for lab, supervisor in targets
        if not is_ready(supervisor)
    }


def _ready_or_idle(supervisor: VmSupervisor) -> Callable[[VmStatus], bool]:
    return lambda status: is_ready(supervisor) or status.state in IDLE


async def start_after(
    supervisor: VmSupervisor,
    waits_for: dict[str, tuple[VmSupervisor, asyncio.Future[VmStatus] | None]],
    announce: Callable[[list[str]], None],
) -> VmStatus:
    """Start `supervisor`'s VM once every node it waits for (boot order: `depends_on`,
    stages) is ready. A node being started by the same `up` is waited for through its own
    start (`started`); one that ends up stopped or failed means this one is not started."""
    if waits_for:
        announce(sorted(waits_for))
    for name, (other, started) in sorted(waits_for.items()):
        if started is not None:
            await asyncio.wait({started})
        await other.wait_for(_ready_or_idle(other))
        if not is_ready(other):
            raise Conflict(f"not started: it waits for {name}, which is {not_ready_because(other)}")
    return await supervisor.submit("start")


def boot_order(waits: dict[str, frozenset[str]], starting: list[str]) -> list[list[str]]:
    """The nodes `up` starts, in waves: each wave's nodes wait only for earlier waves' (or
    for nodes already up)."""
    return waves({name: waits.get(name, frozenset()) & set(starting) for name in starting})
