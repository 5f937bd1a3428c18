"""Packet capture filters on a link end (`filter-dump`), added and removed by the VM's own
supervisor over QMP; `api/capture.py` streams the pcap file QEMU writes."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

from qlink.daemon.labs import Labs
from qlink.errors import QlinkError
from qlink.runtime.handles import MonitorHandle
from qlink.supervisor import VmSupervisor

_capture_serial = itertools.count(1)


async def start_capture(labs: Labs, reference: str) -> tuple[VmSupervisor, str, Path]:
    """A `filter-dump` on the netdev of `NODE:IF`: its id and the pcap file QEMU writes."""
    _, supervisor, interface = labs.find_endpoint(reference)
    plan = supervisor.plan
    nic = plan.nic(interface)
    number = next(_capture_serial)
    filter_id = f"qlink-capture-{number}"
    path = plan.paths.runtime_dir / f"capture-{interface}-{number}.pcap"
    path.unlink(missing_ok=True)

    async def add_filter(qmp: MonitorHandle, pid: int) -> None:
        await qmp.execute(
            "object-add",
            {"qom-type": "filter-dump", "id": filter_id, "netdev": nic.netdev_id,
             "file": str(path)},
        )  # fmt: skip

    await supervisor.call(add_filter)
    return supervisor, filter_id, path


async def stop_capture(supervisor: VmSupervisor, filter_id: str) -> None:
    async def remove_filter(qmp: MonitorHandle, pid: int) -> None:
        await qmp.execute("object-del", {"id": filter_id})

    with contextlib.suppress(QlinkError):  # a QEMU that is gone took its filter along
        await supervisor.call(remove_filter)
