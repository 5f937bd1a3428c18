"""A file checked against the host it is to run on: memory, CPU threads and disk images, each
a located error (`validate` and `up`), with host facts a test chooses."""

from __future__ import annotations

import pytest

from qlink.errors import ConfigError
from qlink.limits import HostResources
from qlink.topology import parse_topology_text

SMALL_HOST = HostResources(
    memory_mib=2048,
    cpus=2,
    image_problem=lambda path: "qcow2 header too short" if path.endswith("bad.qcow2") else None,
)


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_topology_text(text, "lab.yaml", host=SMALL_HOST)
    return [str(issue) for issue in caught.value.issues]


def test_what_fits_the_host_passes() -> None:
    lab = parse_topology_text(
        "name: l\ndefaults: {memory: 2048, cpus: 2, kernel: /k}\nnodes: {a: {}}\n",
        "lab.yaml",
        host=SMALL_HOST,
    )
    assert lab.nodes["a"].memory == 2048


def test_memory_and_cpus_past_the_host_are_blamed_where_they_were_written() -> None:
    text = """\
name: l
defaults:
  memory: 4096
  kernel: /k
nodes:
  a: {}
  b: {memory: 1024, cpus: 8}
"""
    assert issues(text) == [
        "lab.yaml:3: defaults.memory: 4096 MiB of RAM is more than this host has (2048 MiB): "
        "QEMU would start and the host would swap or kill it",
        "lab.yaml:7: nodes.b.cpus: 8 vCPUs is more than this host's 2 CPU threads: each vCPU "
        "is a thread, and more than the host runs at once only slows every guest",
    ]


def test_an_image_that_cannot_back_an_overlay_is_refused_at_its_line() -> None:
    text = "name: l\nnodes:\n  a:\n    image: /images/bad.qcow2\n  b: {image: /images/ok.qcow2}\n"
    assert issues(text) == [
        "lab.yaml:4: nodes.a.image: image /images/bad.qcow2: qcow2 header too short"
    ]
