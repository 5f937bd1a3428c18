"""Where a lab's files live. Pure path arithmetic: nothing here creates or reads a file."""

from __future__ import annotations

import os
from pathlib import Path

# `typing` is not imported either, for the same reason as in the class docstring.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qlink.plan.node_paths import NodePaths


class Layout:
    """The two roots: state that survives a reboot, and sockets and pids that must not.

    A plain immutable class rather than a dataclass: every `qlinkctl` command builds one, and
    `dataclasses` (with `inspect` behind it) would cost it some 20 ms.
    """

    __slots__ = ("runtime_dir", "state_dir")
    state_dir: Path
    runtime_dir: Path

    def __init__(self, state_dir: Path, runtime_dir: Path) -> None:
        object.__setattr__(self, "state_dir", state_dir)
        object.__setattr__(self, "runtime_dir", runtime_dir)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Layout is immutable: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.state_dir, self.runtime_dir) == (
            other.state_dir, other.runtime_dir,
        )  # fmt: skip

    def __hash__(self) -> int:
        return hash((self.state_dir, self.runtime_dir))

    def __repr__(self) -> str:
        return f"Layout(state_dir={self.state_dir!r}, runtime_dir={self.runtime_dir!r})"

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
        # Imported here: NodePaths is a dataclass, wanted only by the verbs that plan.
        from qlink.plan.node_paths import NodePaths  # noqa: PLC0415

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
            seed=state / "seed.iso",
            agent_socket=run / "agent.sock",
        )


def layout_from(root: str | None) -> Layout:
    """`--root DIR`, else `QLINK_ROOT`, else the system directories: qlinkd and qlinkctl
    choose the same way, so they meet on the same control socket."""
    chosen = root or os.environ.get("QLINK_ROOT")
    return Layout.under(Path(os.path.abspath(chosen))) if chosen else Layout.system()
