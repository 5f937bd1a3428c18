"""Where a lab's files live. Pure path arithmetic: nothing here creates or reads a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes, one of them the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class Layout:
    """The two roots: state that survives a reboot, and sockets and pids that must not."""

    state_dir: Path
    runtime_dir: Path

    @classmethod
    def system(cls) -> Layout:
        return cls(Path("/var/lib/qlink"), Path("/run/qlink"))

    @classmethod
    def under(cls, root: Path) -> Layout:
        """Everything below one folder, as `--root DIR` and the tests ask."""
        return cls(root / "lib", root / "run")

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "qlinkd.sock"

    @property
    def daemon_lock(self) -> Path:
        return self.runtime_dir / "qlinkd.lock"

    @property
    def allocations_file(self) -> Path:
        return self.state_dir / "allocations.json"

    @property
    def ssh_key(self) -> Path:
        """The private key `qlinkctl ssh` logs in with; its public half goes to the guests."""
        return self.state_dir / "ssh" / "id_ed25519"

    @property
    def ssh_credential(self) -> Path:
        """The SMBIOS OEM string that hands the public key to guests with a management NIC."""
        return self.state_dir / "ssh" / "authorized_keys.smbios"

    def lab_state_dir(self, lab: str) -> Path:
        return self.state_dir / "labs" / lab

    def node(self, lab: str, node: str) -> NodePaths:
        run = self.runtime_dir / lab / node
        state = self.state_dir / "labs" / lab / "nodes" / node
        return NodePaths(
            runtime_dir=run,
            state_dir=state,
            qmp_socket=run / "qmp.sock",
            console_socket=run / "console.sock",
            pidfile=run / "qemu.pid",
            console_log=state / "console.log",
            qemu_log=state / "qemu.log",
            overlay=state / "disk.qcow2",
        )


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

    def too_long_sockets(self) -> list[Path]:
        return [
            path
            for path in (self.qmp_socket, self.console_socket)
            if len(str(path).encode()) > MAX_SOCKET_PATH
        ]
