"""Built-in kinds: what each common lab network OS needs, as data.

A kind is a named set of node fields (`NodeSettings`) plus how the OS names its data ports
(`ports`) and the name of its first NIC when it keeps that one for management (`mgmt_port`).
The user supplies the image (`kinds: {cumulus-vx: {image: ...}}` in the file, or
`--kinds FILE` when importing); a kind of the same name in the file is laid over the
built-in one field by field. Figures are the vendors' published minimums for a lab VM.
"""

from __future__ import annotations

from typing import Any

from qlink.topology import NodeSettings

# A login prompt on the serial console: every one of these prints `<host> login:` once up.
_LOGIN = {"console": r"login:\s*$"}

BUILTIN_KIND_DATA: dict[str, dict[str, Any]] = {
    # NVIDIA Cumulus VX (4.x boots in 768 MiB; 5.x asks for 2 CPUs and 2 GiB). eth0 is the
    # management port, front-panel ports are swp1, swp2, ... in PCI order.
    "cumulus-vx": {
        "memory": 2048,
        "cpus": 2,
        "nic_model": "virtio-net-pci",
        "mgmt": True,
        "mgmt_port": "eth0",
        "ports": {"prefix": "swp", "first": 1, "step": 1},
        "ready": _LOGIN,
    },
    # SONiC virtual switch (sonic-vs.img): eth0 management, data ports Ethernet0, Ethernet4,
    # ... (four lanes per port, so numbers go in steps of 4).
    "sonic-vs": {
        "memory": 4096,
        "cpus": 2,
        "nic_model": "virtio-net-pci",
        "mgmt": True,
        "mgmt_port": "eth0",
        "ports": {"prefix": "Ethernet", "first": 0, "step": 4},
        "ready": _LOGIN,
    },
    # Arista vEOS-lab: e1000 NICs (its supported model under KVM), Management1 first, then
    # Ethernet1, Ethernet2, ...
    "arista-veos": {
        "memory": 2048,
        "cpus": 2,
        "nic_model": "e1000",
        "mgmt": True,
        "mgmt_port": "Management1",
        "ports": {"prefix": "Ethernet", "first": 1, "step": 1},
        "ready": _LOGIN,
    },
    # A plain Linux guest (a server): eth0 management, eth1, eth2, ... cabled.
    "linux": {
        "memory": 512,
        "cpus": 1,
        "nic_model": "virtio-net-pci",
        "mgmt": True,
        "mgmt_port": "eth0",
        "ports": {"prefix": "eth", "first": 1, "step": 1},
        "ready": _LOGIN,
    },
}

BUILTIN_KINDS: dict[str, NodeSettings] = {
    name: NodeSettings.model_validate(data) for name, data in BUILTIN_KIND_DATA.items()
}


def builtin_kind(name: str) -> NodeSettings | None:
    return BUILTIN_KINDS.get(name)
