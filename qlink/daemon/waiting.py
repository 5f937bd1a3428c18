"""`qlinkctl wait` and `up --wait`: until nodes are ready, or cannot get there."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from qlink.daemon.labs import Labs
from qlink.daemon.views import is_ready, not_ready_because
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
