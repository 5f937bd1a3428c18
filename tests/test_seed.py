"""The `cidata` volume: what cloud-init's NoCloud looks for, written only when it changed."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pycdlib
import pytest

from qlink.dayzero import Seed
from qlink.errors import HostError
from qlink.runtime.seed import SEED_LABEL, build_iso, read_seed, write_seed
from tests.conftest import require

SEED = Seed(
    user_data="#cloud-config\nhostname: leaf1\nwrite_files:\n- path: /etc/motd\n  content: hé\n",
    meta_data="instance-id: leaf1-0123456789abcdef\nlocal-hostname: leaf1\n",
    network_config="version: 2\nethernets: {}\n",
)


def opened(data: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    return iso


def file_of(iso: pycdlib.PyCdlib, **path: str) -> str:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue().decode()


def root_names(iso: pycdlib.PyCdlib, **root: str) -> set[str]:
    names = set()
    for child in iso.list_children(**root):
        if child.is_dot() or child.is_dotdot():
            continue
        if "rr_path" in root:
            assert child.rock_ridge is not None
            names.add(child.rock_ridge.name().decode())
        elif "joliet_path" in root:
            names.add(child.file_identifier().decode("utf-16_be"))
        else:
            names.add(child.file_identifier().decode())
    return names


def test_the_volume_is_labelled_cidata_in_the_primary_and_joliet_descriptors() -> None:
    iso = opened(build_iso(SEED))
    assert iso.pvd.volume_identifier.decode().rstrip() == "cidata" == SEED_LABEL
    assert iso.joliet_vd is not None
    assert iso.joliet_vd.volume_identifier.decode("utf-16_be").rstrip() == "cidata"
    assert iso.has_rock_ridge()
    iso.close()


@pytest.mark.parametrize("root", [{"rr_path": "/"}, {"joliet_path": "/"}])
def test_each_document_has_its_exact_name_and_content(root: dict[str, str]) -> None:
    iso = opened(build_iso(SEED))
    assert root_names(iso, **root) == {"user-data", "meta-data", "network-config"}
    key = next(iter(root))
    for name, text in SEED.files().items():
        assert file_of(iso, **{key: f"/{name}"}) == text
    iso.close()


def test_plain_iso9660_names_are_level_one_and_network_config_only_when_given() -> None:
    iso = opened(build_iso(Seed("#cloud-config\n", "instance-id: a\n")))
    assert root_names(iso, iso_path="/") == {"USERDATA.;1", "METADATA.;1"}
    assert root_names(iso, rr_path="/") == {"user-data", "meta-data"}
    iso.close()


def test_blkid_finds_it_as_cloud_init_does(tmp_path: Path) -> None:
    # cloud-init's util.find_devs_with runs `blkid -c /dev/null -t<criterion> -odevice`:
    # NoCloud keeps what matches both TYPE=iso9660 and LABEL=cidata (DataSourceNoCloud.py).
    blkid = shutil.which("blkid") or "/sbin/blkid"
    require(os.access(blkid, os.X_OK), "blkid (util-linux)")
    path = tmp_path / "seed.iso"
    write_seed(SEED, path)
    for criterion in ("TYPE=iso9660", "LABEL=cidata"):
        found = subprocess.run(
            [blkid, "-c", "/dev/null", f"-t{criterion}", "-odevice", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert found.stdout.split() == [str(path)], (criterion, found)


def test_isoinfo_reads_the_rock_ridge_and_joliet_names(tmp_path: Path) -> None:
    # A second reader besides pycdlib, when genisoimage happens to be installed.
    isoinfo = shutil.which("isoinfo")
    require(isoinfo is not None, "isoinfo is not installed (apt-get install genisoimage)")
    assert isoinfo is not None
    path = tmp_path / "seed.iso"
    write_seed(SEED, path)
    for extension in ("-R", "-J"):
        listing = subprocess.run(
            [isoinfo, "-i", str(path), extension, "-f"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert sorted(listing) == ["/meta-data", "/network-config", "/user-data"]
    extracted = subprocess.run(
        [isoinfo, "-i", str(path), "-R", "-x", "/user-data"], capture_output=True, check=True
    ).stdout
    assert extracted.decode() == SEED.user_data


def test_it_is_written_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    assert write_seed(SEED, path)
    first = path.stat()
    assert stat.S_IMODE(first.st_mode) == 0o600  # user-data may hold passwords
    assert read_seed(path) == SEED

    assert not write_seed(SEED, path)
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    changed = Seed(SEED.user_data + "# edited\n", SEED.meta_data, None)
    assert write_seed(changed, path)
    assert path.stat().st_ino != first.st_ino  # replaced whole: a running QEMU keeps the old
    assert read_seed(path) == changed
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["seed.iso"]


@pytest.mark.parametrize(
    "content",
    [b"", b"not an iso at all" * 1000, b"\0" * 40000],
    ids=["empty", "text", "zeros"],
)
def test_a_damaged_or_foreign_file_is_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "seed.iso"
    path.write_bytes(content)
    assert read_seed(path) is None
    assert write_seed(SEED, path)
    assert read_seed(path) == SEED


def test_a_truncated_volume_or_another_label_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    path.write_bytes(build_iso(SEED)[:40000])
    assert read_seed(path) is None
    other = pycdlib.PyCdlib()
    other.new(vol_ident="CDROM", rock_ridge="1.09")
    other.add_fp(io.BytesIO(b"x"), 1, "/USERDATA.;1", rr_name="user-data")
    other.add_fp(io.BytesIO(b"y"), 1, "/METADATA.;1", rr_name="meta-data")
    other.write(str(path))
    other.close()
    assert read_seed(path) is None
    assert write_seed(SEED, path)


def test_a_folder_that_cannot_be_written_is_a_host_error(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(HostError, match="cannot write the day-0 seed"):
        write_seed(SEED, blocked / "seed.iso")


def test_the_folder_of_a_node_that_never_ran_is_made(tmp_path: Path) -> None:
    assert write_seed(SEED, tmp_path / "labs" / "l" / "nodes" / "n" / "seed.iso")
    assert read_seed(tmp_path / "labs" / "l" / "nodes" / "n" / "seed.iso") == SEED
