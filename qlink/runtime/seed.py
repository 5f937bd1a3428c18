"""A node's day-0 Seed on disk: the ISO 9660 volume labelled `cidata` that cloud-init reads.

What cloud-init's NoCloud asks of the volume (cloudinit/sources/DataSourceNoCloud.py):
- `_get_devices`: a block device that blkid reports as `TYPE=vfat` or `TYPE=iso9660` and
  `LABEL=` the datasource's `fs_label` ("cidata" by default), tried upper and lower case, so
  `cidata` and `CIDATA` both work. The label here is `cidata`, as cloud-localds writes it.
- `_get_data`: it mounts the device and reads, from its root and by exact name, `user-data`
  and `meta-data` (required: `pathprefix2dict(required=[...])`), then `vendor-data` and
  `network-config` when present.
ISO 9660's own names are upper-case 8.3 (`USERDATA.;1`); Linux's isofs shows the Rock Ridge
name first, else the Joliet one, and both carry the exact names, as
`genisoimage -volid cidata -joliet -rock` (cloud-localds) does. pycdlib writes the volume, in
Python: no hand-made ISO writer, no genisoimage on the host.

`write_seed` blocks (a few milliseconds); the daemon calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pycdlib

from qlink.dayzero import Seed
from qlink.errors import HostError

SEED_LABEL = "cidata"

# NoCloud's name -> the ISO 9660 level 1 name beside it (seen only by a reader that knows
# neither Rock Ridge nor Joliet, which cloud-init could not use anyway).
_ISO9660_NAMES = {
    "user-data": "/USERDATA.;1",
    "meta-data": "/METADATA.;1",
    "network-config": "/NETCONF.;1",
}
_FILE_MODE = 0o100444  # Rock Ridge: a regular file, read-only (the volume is read-only)


def build_iso(seed: Seed) -> bytes:
    """The seed volume's bytes: label `cidata`, each document under its exact name."""
    iso = pycdlib.PyCdlib()
    iso.new(
        interchange_level=1,
        vol_ident=SEED_LABEL,
        app_ident_str="qlink",
        joliet=3,
        rock_ridge="1.09",
    )
    try:
        for name, text in seed.files().items():
            data = text.encode()
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=_ISO9660_NAMES[name],
                rr_name=name,
                joliet_path=f"/{name}",
                file_mode=_FILE_MODE,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def read_seed(path: Path) -> Seed | None:
    """The Seed a volume holds, read by its Rock Ridge names; None unless it is one.

    None for a missing file, a file that is not an ISO, a label other than `cidata`, or
    missing documents: whatever it is, `write_seed` should replace it.
    """
    try:
        with open(path, "rb") as file:
            return _read_volume(file)
    except Exception:  # missing, not an ISO, damaged (pycdlib raises anything): rewrite it
        return None


def _read_volume(file: io.BufferedReader) -> Seed | None:
    iso = pycdlib.PyCdlib()
    iso.open_fp(file)
    try:
        if iso.pvd.volume_identifier.decode().rstrip() != SEED_LABEL:
            return None
        names = {
            child.rock_ridge.name().decode()
            for child in iso.list_children(rr_path="/")
            if child.rock_ridge is not None and not child.is_dot() and not child.is_dotdot()
        }
        if not {"user-data", "meta-data"} <= names:
            return None

        def document(name: str) -> str:
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            return out.getvalue().decode()

        network = document("network-config") if "network-config" in names else None
        return Seed(document("user-data"), document("meta-data"), network)
    finally:
        iso.close()


def write_seed(seed: Seed, path: Path) -> bool:
    """Make `path` the seed volume of `seed`, unless it already is; returns whether it wrote.

    The volume on disk is read back and compared (no digest file beside it that could
    disagree with it). It is replaced whole (a temporary file renamed over it), so a QEMU
    starting meanwhile opens the old volume or the new one, never half of one; a QEMU already
    running keeps the old one open until it restarts. Mode 0600: user-data may hold secrets.
    """
    if read_seed(path) == seed:
        return False
    data = build_iso(seed)
    try:
        _write_replacing(path, data)
    except OSError as error:
        raise HostError(f"cannot write the day-0 seed {path}: {error}") from error
    return True


def _write_replacing(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)  # a node that never ran
    descriptor, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            # On disk before the rename: a crash leaves the old volume or the new, not zeros.
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise
