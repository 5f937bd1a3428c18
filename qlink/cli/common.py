"""What every qlinkctl verb shares: exit codes, the usage error, the daemon's client."""

from __future__ import annotations

import argparse

from qlink.cli.client import Client
from qlink.errors import QlinkError
from qlink.plan.paths import layout_from

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class UsageError(QlinkError):
    """The command line itself is wrong (exit 2)."""


def client_for(args: argparse.Namespace) -> Client:
    return Client(layout_from(args.root).control_socket)
