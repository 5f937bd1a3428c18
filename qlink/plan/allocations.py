"""What the plan remembers between runs: UDP ports, management ports, PCI positions.

The plan is pure, so memory is an explicit input and output: `plan_lab` takes the previous
`Allocations` and returns the new one; the runtime persists it. One `Allocations` covers every
lab under a root, which is how two labs never get the same port.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from qlink.errors import PlanError

# Below Linux's ephemeral range (32768-60999), so the kernel never hands one out to a client
# socket that would then hold it against a VM.
DEFAULT_UDP_PORTS = range(20000, 30000)
DEFAULT_SSH_PORTS = range(2200, 3000)


def port_key(lab: str, node: str, interface: str) -> str:
    return f"{lab}/{node}/{interface}"


class Allocations(BaseModel):
    """Every port and position handed out, keyed `lab/node/interface` (`lab/node` for SSH)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    udp_ports: dict[str, int] = Field(default_factory=dict)
    ssh_ports: dict[str, int] = Field(default_factory=dict)
    positions: dict[str, int] = Field(default_factory=dict)

    def other_labs(self, lab: str) -> Allocations:
        """Only what belongs to labs other than `lab`."""
        prefix = f"{lab}/"

        def keep(table: Mapping[str, int]) -> dict[str, int]:
            return {key: value for key, value in table.items() if not key.startswith(prefix)}

        return Allocations(
            udp_ports=keep(self.udp_ports),
            ssh_ports=keep(self.ssh_ports),
            positions=keep(self.positions),
        )

    def of_lab(self, lab: str, table: Mapping[str, int]) -> dict[str, int]:
        prefix = f"{lab}/"
        return {key: value for key, value in table.items() if key.startswith(prefix)}


@dataclass(frozen=True, slots=True)
class PortRequest:
    key: str
    fixed: int | None
    """A port written in the file; it wins over anything remembered within the lab."""
    what: str
    """How to name the requester in an error: `link 3 end spine1:swp1`."""


def allocate_ports(
    requests: Iterable[PortRequest],
    remembered: Mapping[str, int],
    held_elsewhere: Mapping[str, int],
    *,
    pool: range,
    kind: str,
    avoid: frozenset[int] = frozenset(),
) -> dict[str, int]:
    """Give every request a port, keeping what was remembered where it is still free.

    `held_elsewhere` are other labs' ports: never taken, and a fixed port that hits one is an
    error. `avoid` are ports someone on the host holds now: a fresh pick skips them, while a
    fixed or remembered port is kept (the launch then names whoever holds it). Requests come
    in a stable order, so a fresh allocation is a pure function of the inputs.
    """
    requests = list(requests)
    owner_of_port = {port: key for key, port in held_elsewhere.items()}
    assigned: dict[str, int] = {}
    taken: set[int] = set(owner_of_port)

    for request in requests:
        if request.fixed is None:
            continue
        if request.fixed in owner_of_port:
            raise PlanError(
                f"{kind} port {request.fixed} of {request.what} is already used by "
                f"{owner_of_port[request.fixed]}"
            )
        assigned[request.key] = request.fixed
        taken.add(request.fixed)

    for request in requests:
        port = remembered.get(request.key)
        if request.key in assigned or port is None or port in taken:
            continue
        assigned[request.key] = port
        taken.add(port)

    free = (port for port in pool if port not in taken and port not in avoid)
    for request in requests:
        if request.key in assigned:
            continue
        port = next(free, None)
        if port is None:
            raise PlanError(
                f"no free {kind} port left in {pool.start}-{pool.stop - 1} for {request.what}"
            )
        assigned[request.key] = port
        taken.add(port)
    return assigned
