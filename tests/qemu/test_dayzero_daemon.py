"""Day-0 configuration through a real qlinkd and paused QEMUs: each node gets its own
`cidata` volume, and a change to one node's day-0 settings restarts that node alone."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from qlink.runtime.seed import read_seed
from tests.conftest import GuestFiles, Qlinkd, write_lab

pytestmark = pytest.mark.qemu

FAST = ("--backoff-initial", "0.2", "--powerdown-timeout", "0")


def lab_text(guest: GuestFiles, motd_of_b: str) -> str:
    return f"""\
        name: d0
        defaults:
          memory: 64
          accel: tcg
          kernel: {guest.kernel}
          extra_args: [-S]
          cloud_init:
            hostname: "{{{{ node }}}}"
            write_files:
              - {{path: /etc/motd, content: "{{{{ vars.motd }}}}"}}
          vars: {{motd: hello}}
        nodes:
          a: {{}}
          b: {{vars: {{motd: "{motd_of_b}"}}}}
        links:
          - [a:eth1, b:eth1]
        """


def test_each_node_boots_with_its_seed_and_a_change_restarts_only_it(
    qlinkd: Callable[..., Qlinkd], short_root: Path, guest_files: GuestFiles
) -> None:
    daemon = qlinkd(*FAST)
    lab = write_lab(short_root, lab_text(guest_files, "first"))
    daemon.ctl_ok("up", str(lab))
    seeds = {node: short_root / "lib/labs/d0/nodes" / node / "seed.iso" for node in "ab"}
    for node, path in seeds.items():
        seed = read_seed(path)
        assert seed is not None
        assert f"hostname: {node}" in seed.user_data
        assert f"local-hostname: {node}" in seed.meta_data
    blocks = json.loads(daemon.ctl_ok("qmp", "a", "query-block"))
    (cdrom,) = [block for block in blocks if block["device"] == "seed"]
    assert cdrom["inserted"]["file"] == str(seeds["a"])
    assert "content: first" in (read_seed(seeds["b"]) or pytest.fail("no seed")).user_data

    before = {key: row["pid"] for key, row in daemon.status().items()}
    lab.write_text(textwrap.dedent(lab_text(guest_files, "second")))
    plan = daemon.ctl_ok("up", str(lab), "--dry-run")
    assert "restart b: day-0 config changed" in plan
    assert "a:" not in plan.replace("d0:", "")
    daemon.ctl_ok("up", str(lab))
    after = {key: row["pid"] for key, row in daemon.status().items()}
    assert after["d0/a"] == before["d0/a"]
    assert after["d0/b"] != before["d0/b"]
    assert "content: second" in (read_seed(seeds["b"]) or pytest.fail("no seed")).user_data


BAD_DAY_ZERO = {
    # user-data that is not YAML: the field, then the file and the line in it
    "bad-user-data": (
        "cloud_init: user-data.cfg",
        {"user-data.cfg": "#cloud-config\nhostname: [unclosed\n"},
        "lab.yaml:7: nodes.a.cloud_init: ",
    ),
    "missing-file": ("cloud_init: nowhere.cfg", {}, "lab.yaml:7: nodes.a.cloud_init"),
    "bad-ready": ("ready: {console: 'login(:'}", {}, "lab.yaml:7: nodes.a.ready.console"),
}


@pytest.mark.parametrize("case", sorted(BAD_DAY_ZERO))
def test_bad_day_zero_input_is_exit_2_located_and_starts_nothing(
    qlinkd: Callable[..., Qlinkd], short_root: Path, guest_files: GuestFiles, case: str
) -> None:
    field, files, located = BAD_DAY_ZERO[case]
    for name, text in files.items():
        (short_root / name).write_text(text)
    daemon = qlinkd(*FAST)
    lab = write_lab(
        short_root,
        f"""\
        name: bad
        defaults: {{memory: 64, accel: tcg, kernel: {guest_files.kernel}, extra_args: [-S]}}
        nodes:
          b: {{}}
          a:
            # the bad field
            {field}
        """,
    )
    result = daemon.ctl("up", str(lab))
    assert result.returncode == 2, result
    assert located in result.stderr, result.stderr
    if case == "bad-user-data":
        assert "user-data.cfg: not valid YAML at line 3" in result.stderr
    assert daemon.status() == {}
    assert not (short_root / "lib/labs/bad/nodes/b/seed.iso").exists()
