"""Every golden argv starts in real QEMU 7.2 (paused with -S) and answers QMP: proof that QEMU
accepts every option qlink writes, and takes every NIC's socket where the argv says."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from qlink.dayzero import Seed
from qlink.errors import LaunchError
from qlink.plan.node_paths import NodePaths
from qlink.plan.paths import Layout
from qlink.runtime.links import LinkSocket
from qlink.runtime.process import create_overlay, launch
from qlink.runtime.qmp import QmpSession
from qlink.runtime.seed import write_seed
from qlink.runtime.sshkey import ensure_ssh_credential
from tests.conftest import GuestFiles
from tests.golden import golden_path, instantiate, sources

pytestmark = pytest.mark.qemu

TEST_IMAGE = Path("/var/tmp/qlink-tests/base.qcow2")


def ensure_test_image() -> None:
    if TEST_IMAGE.exists():
        return
    TEST_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(TEST_IMAGE), "64M"], check=True)


async def prepare_files(node: dict[str, Any], paths: NodePaths, layout: Layout) -> None:
    """The files the node's argv names, made as qlinkd makes them before a launch."""
    if "image" in node["paths"]:
        ensure_test_image()
        assert await create_overlay(Path(node["paths"]["image"]), paths.overlay)
    if "seed" in node:
        # The day-0 volume, written as qlinkd writes it before a launch.
        files = node["seed"]
        seed = Seed(files["user-data"], files["meta-data"], files.get("network-config"))
        assert seed.digest == files["digest"]
        assert write_seed(seed, paths.seed)
    if node["mgmt"] is not None:
        # The real key and credential, made as qlinkd makes them before a launch.
        credential = Path(node["mgmt"]["ssh_credential"])
        await ensure_ssh_credential(layout.ssh_key, credential)
        assert credential.read_text().startswith("io.systemd.credential.binary:")


async def boot_paused(document: dict[str, Any], root: Path) -> dict[str, float]:
    layout = Layout.under(root)
    ports = StandInPorts()
    launched = []
    seconds: dict[str, float] = {}
    try:
        for name, node in document["nodes"].items():
            paths = layout.node(document["lab"], name)
            assert str(paths.qmp_socket) == node["paths"]["qmp_socket"]
            await prepare_files(node, paths, layout)
            # The argv names each NIC's socket by descriptor only; free ports stand in for
            # the golden ones (a live lab on this host may hold those), peer for peer.
            links = [
                LinkSocket(nic["fd"], ports.end(nic["local"]), ports.end(nic["remote"]))
                for nic in node["nics"]
            ]
            started = time.monotonic()
            process, qmp = await launch([*node["argv"], "-S"], paths, timeout=20, links=links)
            launched.append((process, qmp))
            status = await qmp.execute("query-status")
            seconds[name] = time.monotonic() - started
            assert status["status"] == "prelaunch", status
            for nic in node["nics"]:
                await assert_nic_placed(qmp, nic)
            assert_sockets_handed_over(process.pid, links)
            if "seed" in node:
                await assert_seed_inserted(qmp, paths)
    finally:
        for process, qmp in launched:
            if not process.exited:
                await qmp.execute("quit")
            await process.wait()
            await qmp.close()
    for process, _ in launched:
        assert process.exit_status is not None
        assert process.exit_status.clean
    return seconds


async def assert_seed_inserted(qmp: QmpSession, paths: NodePaths) -> None:
    blocks = {block["device"]: block for block in await qmp.execute("query-block")}
    inserted = blocks["seed"]["inserted"]
    assert (inserted["file"], inserted["ro"]) == (str(paths.seed), True)


class StandInPorts:
    """A free loopback port for each golden port, the same one wherever it appears."""

    def __init__(self) -> None:
        self._ports: dict[int, int] = {}

    def end(self, text: str) -> tuple[str, int]:
        address, _, port = text.rpartition(":")
        while int(port) not in self._ports:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((address, 0))
                free = probe.getsockname()[1]
            # Closed again, the kernel may hand the same port out twice (wide.yaml has 128
            # ports: about one run in four otherwise).
            if free not in self._ports.values():
                self._ports[int(port)] = free
        return address, self._ports[int(port)]


def assert_sockets_handed_over(pid: int, links: list[LinkSocket]) -> None:
    """QEMU holds each NIC's socket at its planned number, bound and connected as planned, and
    this process kept no copy."""
    held = {
        connection.fd: (tuple(connection.laddr), tuple(connection.raddr))
        for connection in psutil.Process(pid).net_connections(kind="udp4")
    }
    assert held == {link.fd: (link.local, link.remote) for link in links}
    ours = psutil.Process().net_connections(kind="udp4")
    assert not {tuple(c.laddr) for c in ours} & {link.local for link in links}


async def assert_nic_placed(qmp: QmpSession, nic: dict[str, Any]) -> None:
    """The NIC exists with the planned MAC, on the planned bus at the planned slot.

    query-pci cannot see behind bridges while the guest is paused (no bus numbers yet), so
    this asks QOM, which knows the device tree before the firmware runs.
    """
    path = f"/machine/peripheral/nic-{nic['interface']}"

    async def prop(name: str) -> Any:
        return await qmp.execute("qom-get", {"path": path, "property": name})

    assert await prop("mac") == nic["mac"]
    assert await prop("addr") == int(nic["pci"]["addr"], 16) << 3  # devfn: slot, function 0
    bus = nic["pci"]["bus"]
    expected = "/machine/q35/pcie.0" if bus == "pcie.0" else f"/machine/peripheral/{bus}/{bus}"
    assert await prop("parent_bus") == expected
    assert await prop("netdev") == f"net-{nic['interface']}"


@pytest.mark.parametrize("source", sources(), ids=lambda path: path.name)
async def test_golden_argv_starts_in_qemu(
    source: Path, short_root: Path, qemu_binary: str, guest_files: GuestFiles
) -> None:
    document = instantiate(golden_path(source).read_text(), short_root)
    seconds = await boot_paused(document, short_root)
    assert set(seconds) == set(document["nodes"])


async def test_a_failed_launch_reports_qemus_own_words(short_root: Path, qemu_binary: str) -> None:
    paths = Layout.under(short_root).node("bad", "node")
    with pytest.raises(LaunchError) as caught:
        await launch([qemu_binary, "-nodefaults", "-machine", "no-such-machine"], paths, timeout=10)
    assert caught.value.returncode == 1
    assert "unsupported machine type" in caught.value.stderr_tail
    assert "exited with status 1" in str(caught.value)
