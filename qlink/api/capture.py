"""Packet capture of one link end, with QEMU's own `filter-dump` added and removed over QMP
(by the VM's supervisor, `daemon/filters.py`).

No bridge and no restart: the filter sits on the netdev and sees both directions. QEMU
writes a pcap file; the daemon follows the file as it grows and streams it to the client, so
`qlinkctl capture leaf1:swp51 -w - | wireshark -k -i -` works.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import structlog
from asyncinotify import Inotify, Mask

from qlink.daemon import Daemon
from qlink.daemon.filters import start_capture, stop_capture

log = structlog.get_logger(__name__)

CHUNK = 65536


async def capture(daemon: Daemon, endpoint: str) -> AsyncGenerator[bytes, None]:
    """pcap bytes of `NODE:IF`, both directions, until the caller stops."""
    supervisor, filter_id, path = await start_capture(daemon.labs, endpoint)
    log.info("capture_started", endpoint=endpoint, file=str(path))
    try:
        async for chunk in _follow(path):
            yield chunk
    finally:
        await stop_capture(supervisor, filter_id)
        path.unlink(missing_ok=True)
        log.info("capture_stopped", endpoint=endpoint)


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
