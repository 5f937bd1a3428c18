"""Every error qlink raises on purpose.

Errors carry data; only the CLI turns them into a message, a hint and an exit code.

    QlinkError
     ├── ConfigError          the topology file is wrong (file, line, field, what); exit 2
     ├── PlanError            a valid file that cannot be planned (port clash across labs, ...)
     ├── HostError            the host lacks something (qemu binary, a kernel file, free disk)
     │    └── PortInUseError  a UDP port the plan needs is held by another process
     ├── LaunchError          QEMU refused to start: argv, exit code, the tail of its stderr
     ├── VmError              a running VM misbehaved (QMP gone, did not stop in time)
     │    └── QmpCommandError  QEMU refused a QMP command (carries QEMU's error_class)  (422)
     ├── NotFound             no such lab, node or interface is up               (API: 404)
     ├── Conflict             the request does not fit what runs now             (API: 409)
     │    ├── NotRunning      the VM is in a state that cannot serve it (carries the state)
     │    └── Gone            the VM's supervisor has ended (lab down, node removed)
     ├── Invalid              the request itself is malformed                    (API: 400)
     ├── Forbidden            the caller may not do this (a QMP command for root only)
     └── ControlError         the control API answered with an error, or was unreachable
          └── DaemonUnreachable  no qlinkd answers on the control socket; exit 3

The core raises the domain errors; the API alone picks HTTP statuses, the CLI exit codes.
"""

from __future__ import annotations

from collections.abc import Sequence


class QlinkError(Exception):
    """Base of every error qlink raises on purpose."""


class ConfigIssue:
    """One thing wrong in a topology file, located as precisely as the parser allows.

    A plain immutable class rather than a dataclass: every `qlinkctl` command imports this
    module, and `dataclasses` (with `inspect` behind it) would cost it some 20 ms.
    """

    __slots__ = ("field", "file", "line", "message")

    def __init__(self, file: str, line: int | None, field: str, message: str) -> None:
        object.__setattr__(self, "file", file)
        object.__setattr__(self, "line", line)
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "message", message)

    file: str
    line: int | None
    field: str
    message: str

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ConfigIssue is immutable: cannot set {name}")

    def _key(self) -> tuple[str, int | None, str, str]:
        return (self.file, self.line, self.field, self.message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigIssue) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return "ConfigIssue(file={!r}, line={!r}, field={!r}, message={!r})".format(*self._key())

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ConfigError(QlinkError):
    """The topology file is invalid; holds every issue found, in file order."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        # A default shared by several nodes yields the same issue once per node: say it once.
        self.issues: tuple[ConfigIssue, ...] = tuple(
            sorted(dict.fromkeys(issues), key=lambda issue: (issue.line or 0, issue.field))
        )
        super().__init__("\n".join(str(issue) for issue in self.issues))


class PlanError(QlinkError):
    """A valid topology that cannot be turned into a plan."""


class HostError(QlinkError):
    """The host cannot run what was planned."""


class PortInUseError(HostError):
    """A UDP port the plan binds is already bound by someone else."""

    def __init__(self, port: int, address: str, holder: str | None) -> None:
        self.port = port
        self.address = address
        self.holder = holder
        held_by = f" by {holder}" if holder else ""
        super().__init__(f"UDP {address}:{port} is already bound{held_by}")


class LaunchError(QlinkError):
    """QEMU did not come up: it exited, or never answered on QMP."""

    def __init__(
        self, reason: str, argv: Sequence[str], returncode: int | None, stderr_tail: str
    ) -> None:
        self.reason = reason
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        tail = f"\n{stderr_tail.rstrip()}" if stderr_tail.strip() else ""
        super().__init__(f"{reason}{tail}")


class VmError(QlinkError):
    """A running VM did something the supervisor could not handle."""


class QmpCommandError(VmError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        self.command = command
        self.error_class = error_class
        self.description = description
        super().__init__(f"QMP {command} failed: {error_class}: {description}")


class NotFound(QlinkError):
    """A lab, node or interface that is not up."""


class Conflict(QlinkError):
    """The request is well-formed but clashes with what runs now."""


class NotRunning(Conflict):
    """A command that needs a running VM reached one in another state."""

    def __init__(self, node: str, state: str, wanted: str = "running") -> None:
        self.node = node
        self.state = state
        self.wanted = wanted
        super().__init__(f"{node} is {state}, not {wanted}")


class Gone(Conflict):
    """The VM's supervisor has ended: its lab went down or its node left the file."""

    def __init__(self, node: str) -> None:
        self.node = node
        super().__init__(f"{node} is no longer supervised (its lab is down, or it was removed)")


class Invalid(QlinkError):
    """The request is malformed: a bad reference, an unknown verb, a wrong body."""


class Forbidden(QlinkError):
    """The caller is not allowed to do this."""


class ControlError(QlinkError):
    """The control API refused a request; `status` is the HTTP status it answered."""

    def __init__(self, message: str, status: int = 500, hint: str | None = None) -> None:
        self.status = status
        self.hint = hint
        super().__init__(message)


class DaemonUnreachable(ControlError):
    """Nothing answers on the control socket."""

    def __init__(self, socket_path: str, cause: str) -> None:
        self.socket_path = socket_path
        super().__init__(
            f"qlinkd is not answering on {socket_path}: {cause}",
            status=503,
            hint="start it with `systemctl start qlinkd` or `qlinkd --root DIR`",
        )
