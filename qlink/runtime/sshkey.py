"""The key `qlinkctl ssh` logs in with.

One ed25519 key pair per qlink root, made by qlinkd the first time a node with a management
NIC starts. Its public half reaches the guests as the systemd credential
`ssh.authorized_keys.root` in an SMBIOS OEM string (`-smbios type=11,path=...`), which
systemd >= 252 installs as root's authorized_keys; so `qlinkctl ssh` needs no password on
Debian 12 guests and on the qlink test guest.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import tempfile
from pathlib import Path

from qlink.errors import HostError
from qlink.runtime.tools import run_tool

CREDENTIAL_NAME = "ssh.authorized_keys.root"


def public_key_path(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def smbios_credential(public_keys: str) -> str:
    """The OEM string carrying `public_keys` (base64, so newlines and commas pass intact)."""
    encoded = base64.b64encode(public_keys.encode()).decode()
    return f"io.systemd.credential.binary:{CREDENTIAL_NAME}={encoded}"


async def ensure_ssh_credential(private_key: Path, credential: Path) -> bool:
    """Make the key pair unless it exists, and the credential file from its public half.

    Returns whether anything was written. Both files are replaced whole (rename), so a QEMU
    starting meanwhile reads the old content or the new, never half of one.
    """
    created = False
    if not private_key.exists():
        await _generate_key_pair(private_key)
        created = True
    try:
        public = public_key_path(private_key).read_text()
    except OSError as error:
        raise HostError(f"cannot read the SSH public key: {error}") from error
    wanted = smbios_credential(public.strip() + "\n")
    try:
        current = credential.read_text()
    except FileNotFoundError:
        current = None
    except OSError as error:
        raise HostError(f"cannot read {credential}: {error}") from error
    if current != wanted:
        _write_replacing(credential, wanted, mode=0o644)
        created = True
    return created


async def _generate_key_pair(private_key: Path) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise HostError(
            "a node has `mgmt: true` but ssh-keygen is missing (apt-get install openssh-client)"
        )
    private_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # ssh-keygen writes KEY and KEY.pub; made in a scratch folder beside them and moved in,
    # public half first, so an existing private key always has its public half.
    with tempfile.TemporaryDirectory(dir=private_key.parent, prefix=".keygen-") as scratch:
        scratch_key = Path(scratch) / private_key.name
        returncode, _, stderr = await run_tool(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"qlink@{socket.gethostname()}",
             "-f", str(scratch_key)],
        )  # fmt: skip
        if returncode != 0:
            raise HostError(f"ssh-keygen failed: {stderr.strip()}")
        os.replace(public_key_path(scratch_key), public_key_path(private_key))
        os.replace(scratch_key, private_key)


def _write_replacing(path: Path, text: str, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        partial.chmod(mode)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise HostError(f"cannot write {path}: {error}") from error
