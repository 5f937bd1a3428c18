"""qlinkd's core, one concern a module; data flows down this list:

records.py   what is kept of a lab under the root (lab.json, process.json)
changes.py   pure: what `up` must do to a running lab, and why
labs.py      the labs that are up, and finding a node or an interface in them
hooks.py     what each VM's supervisor asks of the daemon (ports, files, records, events)
carrier.py   one owner per lab for carrier: what QEMU acknowledged, kept in line
events.py    the event stream (node states, carrier, labs) for the API and the tests
views.py     read models: the rows of `status` and `links`
core.py      `Daemon`: wires the above to the supervisors and carries out operations
"""

from qlink.daemon.core import Daemon

__all__ = ["Daemon"]
