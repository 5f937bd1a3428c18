"""Packet capture of one link end, with QEMU's own `filter-dump` added and removed over QMP.

No bridge and no restart: the filter sits on the netdev and sees both directions. QEMU
writes a pcap file; the daemon follows the file as it grows and streams it to the client, so
`qlinkctl capture leaf1:swp51 -w - | wireshark -k -i -` works.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import structlog
from asyncinotify import Inotify, Mask

from qlink.errors import ControlError, VmError
from qlink.supervisor import VmSupervisor

log = structlog.get_logger(__name__)

_serial = itertools.count(1)
CHUNK = 65536


async def capture(supervisor: VmSupervisor, interface: str) -> AsyncGenerator[bytes, None]:
    """pcap bytes of `interface` on the node, both directions, until the caller stops."""
    plan = supervisor.plan
    try:
        nic = plan.nic(interface)
    except KeyError:
        raise ControlError(f"{plan.name} has no interface {interface!r}", status=404) from None
    qmp = supervisor.qmp
    if qmp is None:
        raise ControlError(f"{plan.name} is {supervisor.status.state.value}", status=409)
    number = next(_serial)
    filter_id = f"qlink-capture-{number}"
    path = plan.paths.runtime_dir / f"capture-{interface}-{number}.pcap"
    path.unlink(missing_ok=True)
    try:
        await qmp.execute(
            "object-add",
            {"qom-type": "filter-dump", "id": filter_id, "netdev": nic.netdev_id,
             "file": str(path)},
        )  # fmt: skip
    except VmError as error:
        raise ControlError(f"cannot capture {plan.name}:{interface}: {error}", 409) from error
    log.info("capture_started", node=plan.name, interface=interface, file=str(path))
    try:
        async for chunk in _follow(path):
            yield chunk
    finally:
        live = supervisor.qmp
        if live is not None:
            with contextlib.suppress(VmError):
                await live.execute("object-del", {"id": filter_id})
        path.unlink(missing_ok=True)
        log.info("capture_stopped", node=plan.name, interface=interface)


async def _follow(path: Path) -> AsyncIterator[bytes]:
    """The file's bytes, then every append as it happens (inotify, no polling)."""
    with Inotify() as inotify, path.open("rb") as handle:
        inotify.add_watch(path, Mask.MODIFY)
        while True:
            chunk = handle.read(CHUNK)
            if chunk:
                yield chunk
                continue
            await inotify.get()
