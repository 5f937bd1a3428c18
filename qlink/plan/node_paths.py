"""The files of one node (see `Layout.node`). Pure path arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes, one of them the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class NodePaths:
    runtime_dir: Path
    state_dir: Path
    qmp_socket: Path
    console_socket: Path
    pidfile: Path
    console_log: Path
    qemu_log: Path
    """QEMU's own stdout and stderr."""
    overlay: Path
    """The qcow2 overlay a node booting an `image` runs on; the image itself stays untouched."""
    seed: Path
    """The node's day-0 NoCloud volume (`cidata`), when its file gives day-0 settings."""
    agent_socket: Path
    """The guest agent's channel, when the node is `ready: {agent: true}`."""

    def too_long_sockets(self) -> list[Path]:
        return [
            path
            for path in (self.qmp_socket, self.console_socket, self.agent_socket)
            if len(str(path).encode()) > MAX_SOCKET_PATH
        ]
