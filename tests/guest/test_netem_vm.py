"""netem measured where the kernel has it: this host's kernel has no netem (no
CONFIG_NET_SCH_NETEM, no modules), so tests/test_impair_tc.py's netem tests skip here. This
test boots the Debian lab image (guest/build-image; Debian's cloud kernel 6.1, with sch_netem,
sch_htb and cls_u32 as modules) as a one-node lab under qlinkd and runs that file inside it,
with pytest, against the same code (`qlink/runtime/impair.py` driving the guest's tc in a
network namespace of the guest's), where none of its tests may skip or fail.

How the checkout gets into the guest: the cloud kernel has no 9p (CONFIG_NET_9P is unset)
and virtiofs would need a virtiofsd and shared guest memory, so the checkout and the
virtualenv go in as read-only virtio disks, each an ext4 file system made from the directory
by `mkfs.ext4 -d` (no root, no loop device). The guest mounts them at the same paths as on
the host, so the venv's python (a symlink to /usr/bin/python3, Debian 12's 3.11 in both) and
its packages work as they are. About 2-4 minutes under TCG: the boot is most of it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Qlinkd, require, write_lab

pytestmark = pytest.mark.guest

StartDaemon = Callable[..., Qlinkd]

REPO = Path(__file__).resolve().parents[2]
IMAGE = Path(os.environ.get("QLINK_IMAGE_DIR", "/var/cache/qlink/image"), "debian-frr.qcow2")
UP_TIMEOUT = 900  # one TCG guest, on a machine that may be busy
INSIDE_TIMEOUT = 900
# Every test of the file but the one about a kernel without netem: inside, all must pass.
SELECTION = "not without_netem"
EXPECTED_PASSED = 9


def disk_image(source: Path, image: Path, label: str) -> None:
    """An ext4 file system holding `source`'s tree, as a raw disk image."""
    used = subprocess.run(["du", "-sk", str(source)], capture_output=True, text=True,
                          check=True).stdout.split()[0]  # fmt: skip
    size_kib = int(int(used) * 1.3) + 64 * 1024  # room for the file system's own metadata
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(source), "-E", "root_owner=0:0",
         str(image), f"{size_kib}k"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip


def shared_trees() -> dict[str, Path]:
    """{disk label: host directory}: the checkout, and the venv unless it is inside it."""
    venv = Path(sys.prefix).resolve()
    trees = {"qlink-repo": REPO}
    if not venv.is_relative_to(REPO):
        trees["qlink-venv"] = venv
    return trees


def lab_file(root: Path, disks: dict[str, Path]) -> Path:
    drives = []
    for number, image in enumerate(disks.values()):
        drives += ["-drive", f"file={image},format=raw,if=virtio,readonly=on,id=share{number}"]
    extra = ", ".join(f'"{item}"' for item in drives)
    return write_lab(
        root,
        f"""\
        name: netem
        nodes:
          vm:
            image: {IMAGE}
            memory: 768
            accel: tcg
            mgmt: true
            ready: {{console: "login:"}}
            extra_args: [{extra}]
        """,
        name="netem.yaml",
    )


def inside_script(trees: dict[str, Path]) -> str:
    """Mount the shared trees at their host paths, load netem, run the tests."""
    mounts = " && ".join(
        f"mkdir -p {shlex.quote(str(path))} && mount -o ro LABEL={label} {shlex.quote(str(path))}"
        for label, path in trees.items()
    )
    python = shlex.quote(str(Path(sys.prefix) / "bin" / "python"))
    return (
        f"set -e; {mounts}; modprobe -a sch_netem sch_htb cls_u32; uname -r; "
        f"cd {shlex.quote(str(REPO))}; "
        f"PYTHONDONTWRITEBYTECODE=1 {python} -m pytest -q -s -p no:cacheprovider -rA "
        f"tests/test_impair_tc.py -k {shlex.quote(SELECTION)}"
    )


def ssh_answers(daemon: Qlinkd, timeout: float = 120) -> float:
    """Seconds until sshd answers: the console's login prompt can come before it listens."""
    started = time.monotonic()
    while (result := daemon.ctl("ssh", "vm", "--", "true", timeout=60)).returncode != 0:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"ssh to the guest: {result.stderr.strip()}")
        time.sleep(2)  # no event says sshd listens in the guest: ask again
    return time.monotonic() - started


def test_netem_measured_inside_the_lab_image(qlinkd: StartDaemon, short_root: Path) -> None:
    started = time.monotonic()
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 is not installed")
    require(IMAGE.is_file(), f"the lab image is not built: {IMAGE} (run guest/build-image)")
    require(
        shutil.which("mkfs.ext4") is not None, "mkfs.ext4 is missing (apt-get install e2fsprogs)"
    )
    require(sys.prefix != sys.base_prefix, "run from the project's virtualenv (scripts/setup)")

    trees = shared_trees()
    disks = {label: short_root / f"{label}.img" for label in trees}
    for label, tree in trees.items():
        disk_image(tree, disks[label], label)
    figures = {"shared disks made": f"{time.monotonic() - started:.1f} s"}

    daemon = qlinkd("--powerdown-timeout", "10")
    booting = time.monotonic()
    daemon.ctl_ok("up", str(lab_file(short_root, disks)), "--wait", "--timeout",
                  str(UP_TIMEOUT), timeout=UP_TIMEOUT + 60)  # fmt: skip
    figures["up --wait (boot to login under TCG)"] = f"{time.monotonic() - booting:.1f} s"

    figures["ssh answered after login"] = f"{ssh_answers(daemon):.1f} s"
    inside = time.monotonic()
    result = daemon.ctl("ssh", "vm", "--", inside_script(trees), timeout=INSIDE_TIMEOUT)
    output = result.stdout + result.stderr
    figures["pytest inside the guest"] = f"{time.monotonic() - inside:.1f} s"
    assert result.returncode == 0, output
    kernel = re.search(r"^(\d+\.\d+\S*)$", output, re.MULTILINE)
    figures["guest kernel"] = kernel.group(1) if kernel else "?"
    summary = output.strip().splitlines()[-1]
    assert re.search(rf"\b{EXPECTED_PASSED} passed\b", summary), summary
    assert not re.search(r"skipped|failed|error|xfail|xpass", summary), summary
    assert "FIGURE netem loss" in output, output

    daemon.ctl_ok("down", "netem", timeout=180)
    figures["test"] = f"{time.monotonic() - started:.1f} s"
    lines = [line for line in output.splitlines() if line.startswith("FIGURE")]
    print("\n".join([*lines, *(f"FIGURE {name}: {value}" for name, value in figures.items())]))
