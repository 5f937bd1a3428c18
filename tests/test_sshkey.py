"""The SSH key qlinkd hands to guests: made once, carried as a systemd credential."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from qlink.errors import HostError
from qlink.plan.paths import Layout
from qlink.runtime.sshkey import ensure_ssh_credential, public_key_path, smbios_credential
from tests.fakes import FakeRuntime
from tests.test_daemon_core import lab_of, serving


def decoded_keys(credential: Path) -> str:
    name, _, encoded = credential.read_text().partition("=")
    assert name == "io.systemd.credential.binary:ssh.authorized_keys.root"
    return base64.b64decode(encoded).decode()


async def test_the_key_is_made_once_and_its_public_half_is_the_credential(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path)
    assert await ensure_ssh_credential(layout.ssh_key, layout.ssh_credential)
    public = public_key_path(layout.ssh_key).read_text()
    assert public.startswith("ssh-ed25519 ")
    assert decoded_keys(layout.ssh_credential) == public.strip() + "\n"
    assert stat.S_IMODE(layout.ssh_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(layout.ssh_key.parent.stat().st_mode) == 0o700
    private = layout.ssh_key.read_bytes()

    assert not await ensure_ssh_credential(layout.ssh_key, layout.ssh_credential)
    assert layout.ssh_key.read_bytes() == private
    leftovers = [path.name for path in layout.ssh_key.parent.iterdir() if path.name[0] == "."]
    assert leftovers == []


async def test_a_lost_or_stale_credential_is_rewritten_from_the_same_key(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path)
    await ensure_ssh_credential(layout.ssh_key, layout.ssh_credential)
    first = layout.ssh_credential.read_text()
    layout.ssh_credential.unlink()
    assert await ensure_ssh_credential(layout.ssh_key, layout.ssh_credential)
    assert layout.ssh_credential.read_text() == first
    layout.ssh_credential.write_text("io.systemd.credential:ssh.authorized_keys.root=old\n")
    assert await ensure_ssh_credential(layout.ssh_key, layout.ssh_credential)
    assert layout.ssh_credential.read_text() == first


def test_the_oem_string_has_no_comma_or_newline_for_qemu_to_trip_on() -> None:
    keys = "ssh-ed25519 AAAA a,b\nssh-rsa BBBB c\n"
    credential = smbios_credential(keys)
    assert "," not in credential
    assert "\n" not in credential
    assert base64.b64decode(credential.partition("=")[2]).decode() == keys


async def test_without_ssh_keygen_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    layout = Layout.under(tmp_path)
    with pytest.raises(HostError, match="apt-get install openssh-client"):
        await ensure_ssh_credential(layout.ssh_key, layout.ssh_credential)
    assert not layout.ssh_credential.exists()


async def test_nodes_starting_together_share_one_key_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four mgmt nodes start at once: ssh-keygen runs once, and the credential every QEMU is
    given carries the public half of the one private key on disk. (Unserialised, each node
    made a pair, and the nodes launched before the last one carried a key nobody had.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runs = tmp_path / "keygen-runs"
    keygen = bin_dir / "ssh-keygen"
    keygen.write_text(f'#!/bin/sh\necho run >>{runs}\nsleep 0.2\nexec /usr/bin/ssh-keygen "$@"\n')
    keygen.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    lab = lab_of(
        "name: four\ndefaults: {kernel: /k, mgmt: true}\nnodes: {a: {}, b: {}, c: {}, d: {}}\n"
        "links:\n  - [a:eth1, b:eth1]\n  - [c:eth1, d:eth1]\n"
    )
    async with serving(tmp_path / "root", FakeRuntime()) as daemon:
        events = [event async for event in daemon.up(lab)]
        assert events[-1]["failed"] == {}
    layout = Layout.under(tmp_path / "root")
    assert runs.read_text().splitlines() == ["run"]
    assert decoded_keys(layout.ssh_credential) == public_key_path(layout.ssh_key).read_text()
