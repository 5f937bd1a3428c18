"""Every golden argv starts in real QEMU 7.2 (paused with -S) and answers QMP: proof that QEMU
accepts every option qlink writes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from qlink.dayzero import Seed
from qlink.errors import LaunchError, PortInUseError
from qlink.plan.node_paths import NodePaths
from qlink.plan.paths import Layout
from qlink.runtime.ports import check_udp_ports_free
from qlink.runtime.process import create_overlay, launch
from qlink.runtime.qmp import QmpSession
from qlink.runtime.seed import write_seed
from qlink.runtime.sshkey import ensure_ssh_credential
from tests.conftest import GuestFiles, require
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
    launched = []
    seconds: dict[str, float] = {}
    try:
        for name, node in document["nodes"].items():
            paths = layout.node(document["lab"], name)
            assert str(paths.qmp_socket) == node["paths"]["qmp_socket"]
            await prepare_files(node, paths, layout)
            # The golden ports are fixed; a live lab on this host may hold them, and a QEMU
            # bound to them (SO_REUSEADDR) would steal its frames.
            udp_ports = [int(nic["local"].rpartition(":")[2]) for nic in node["nics"]]
            try:
                check_udp_ports_free("127.0.0.1", udp_ports)
            except PortInUseError as error:
                require(False, f"a golden port is in use on this host, not stealing it: {error}")
            started = time.monotonic()
            process, qmp = await launch([*node["argv"], "-S"], paths, timeout=20)
            launched.append((process, qmp))
            status = await qmp.execute("query-status")
            seconds[name] = time.monotonic() - started
            assert status["status"] == "prelaunch", status
            for nic in node["nics"]:
                await assert_nic_placed(qmp, nic)
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
