"""A VM's states and their named groups; nobody compares state strings.

Imports nothing, as supervisor's `states.py`, so every layer (the API's read models, the
console hub, the carrier owner, qlinkctl's tests) can name a state without the runtime.

    STOPPED ──start──► STARTING ──QMP answers──► RUNNING ──stop/restart──► STOPPING
       ▲                  │                        │                          │
       │            launch failed          exited / hung                      │
       │                  ▼                        ▼                          │
       │               BACKOFF ◄──policy restarts──┘      stop: STOPPED ◄─────┘
       └──────────────────┴────────► FAILED (too many quick failures)
"""

import enum


class VmState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FAILED = "failed"


IDLE = frozenset({VmState.STOPPED, VmState.FAILED})
"""No QEMU, and none coming until an operator asks: a start is due."""

WITH_PROCESS = frozenset({VmState.RUNNING, VmState.STOPPING})
"""A QEMU process exists that the supervisor watches."""

SERVES_QMP = frozenset({VmState.RUNNING})
"""The only state in which commands reach the VM's QMP."""

MOVES_CARRIER = frozenset(
    {VmState.RUNNING, VmState.STOPPING, VmState.BACKOFF, VmState.FAILED, VmState.STOPPED}
)
"""Transitions after which the carrier of the node's links and its peers' may change."""

GIVES_PEERS_CARRIER = frozenset({VmState.RUNNING, VmState.STARTING})
"""A node whose peers keep carrier: running, or about to (a lab coming up would otherwise
take each first node's links down and up again as its peers start)."""

SETTLED = frozenset({VmState.RUNNING, VmState.STOPPED, VmState.FAILED})
"""Where a start, stop or restart ends, one way or another."""
