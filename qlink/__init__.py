"""qlink: network labs of QEMU VMs wired by UDP tunnels, supervised by qlinkd."""

__version__ = "0.1.0"
