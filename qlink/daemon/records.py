"""What qlinkd keeps of each lab under the root, so that the next qlinkd re-adopts its VMs:
the validated lab with the operator's choices (`lab.json`), and per node the QEMU it runs
(`process.json`: PID, start time, argv)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from qlink.impairment import LinkImpairment
from qlink.plan.lab import NodePlan
from qlink.plan.paths import Layout
from qlink.runtime.process import ProcessIdentity
from qlink.state import write_model
from qlink.topology import Lab

log = structlog.get_logger("qlinkd")


class LabRecord(BaseModel):
    """The validated lab and what should run."""

    model_config = ConfigDict(extra="forbid")

    lab: Lab
    stopped: list[str] = []
    """Nodes an operator stopped: they stay stopped across daemon restarts."""
    links_down: list[str] = []
    """Links an operator cut (`qlinkctl link down`), by `Link.key`; kept across restarts."""
    impair: dict[str, LinkImpairment] = {}
    """Live impairment (`qlinkctl link set`), by `Link.key`: it wins over the file's `impair:`
    (an empty one is a `--clear`); kept across restarts (`daemon/impairs.py`)."""


class ProcessRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pid: int
    start_time: float
    argv: list[str]


def _process_file(plan: NodePlan) -> Path:
    return plan.paths.state_dir / "process.json"


class LabStore:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def _lab_file(self, name: str) -> Path:
        return self.layout.lab_state_dir(name) / "lab.json"

    def save(self, record: LabRecord) -> None:
        write_model(self._lab_file(record.lab.name), record)

    def forget(self, name: str) -> None:
        self._lab_file(name).unlink(missing_ok=True)

    def saved(self) -> Iterator[LabRecord]:
        """Every lab a previous qlinkd left up; an unreadable record is logged and skipped."""
        for lab_file in sorted((self.layout.state_dir / "labs").glob("*/lab.json")):
            try:
                yield LabRecord.model_validate_json(lab_file.read_text())
            except (OSError, ValidationError) as error:
                log.error("lab_record_unreadable", path=str(lab_file), error=str(error))

    @staticmethod
    def record_process(plan: NodePlan, identity: ProcessIdentity | None) -> None:
        path = _process_file(plan)
        if identity is None:
            path.unlink(missing_ok=True)
            return
        record = ProcessRecord(
            pid=identity.pid, start_time=identity.start_time, argv=list(identity.argv)
        )
        # Not durable (no fsync, which cost ~8 ms per launch on the event loop): the record is
        # for a qlinkd that died, and the page cache outlives it; a power loss takes the VM
        # with it, and a missing or stale record only means that VM is not adopted.
        write_model(path, record, durable=False)

    @staticmethod
    def recorded_process(plan: NodePlan) -> ProcessIdentity | None:
        try:
            record = ProcessRecord.model_validate_json(_process_file(plan).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as error:
            log.warning("process_record_unreadable", node=plan.name, error=str(error))
            return None
        return ProcessIdentity(record.pid, record.start_time, tuple(record.argv))
