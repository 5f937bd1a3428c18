"""Hardening of the parse side (issue #15): each finding is a test that failed before its fix.

- YAML alias bombs, node floods and deep nesting are refused, fast, at their line;
- a file is read within a size cap and as UTF-8, with the line and offset of a bad byte;
- `extra_args` are read as QEMU reads them, and whatever takes something qlink owns is refused
  with the reason, at its item's line;
- cpus and memory past what QEMU 7.2 can give a guest are refused at parse time.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import pytest

from qlink.errors import ConfigError, ConfigIssue
from qlink.plan.argv import HostFacts, build_argv, qemu_opts
from qlink.plan.identity import (
    BRIDGE_COUNT,
    FIRST_BRIDGE_SLOT,
    MGMT_SLOT,
    ROOT_BUS,
    bridge_id,
)
from qlink.plan.lab import plan_lab
from qlink.plan.options import option_groups
from qlink.plan.paths import Layout
from qlink.screen import (
    OTHER_TARGET_OPTIONS,
    QEMU_OPTIONS,
    QLINK_ROOT_SLOTS,
    is_qlink_id,
    option_name,
    screen_extra_args,
)
from qlink.screen import ROOT_BUS as SCREEN_ROOT_BUS
from qlink.sourcefile import MAX_TOPOLOGY_BYTES, read_topology_text
from qlink.topology import NicModel, load_topology, parse_topology_text
from qlink.yamlload import MAX_ALIAS_NODES, MAX_YAML_DEPTH, MAX_YAML_NODES
from tests.conftest import require
from tests.golden import sources

OPTIONS_FILE = Path(__file__).parent / "data" / "qemu-7.2-options.txt"
QEMU_ARCH_I386 = 1 << 3


def issues_of(text: str, source: str = "lab.yaml") -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_topology_text(text, source)
    return list(caught.value.issues)


def only_issue(text: str) -> ConfigIssue:
    issues = issues_of(text)
    assert len(issues) == 1, issues
    return issues[0]


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


# --- YAML bounds ----------------------------------------------------------------------------


def billion_laughs(levels: int = 9, indent: str = "  ") -> list[str]:
    """`&a0 [lol x9]`, then each level nine aliases of the one before: 9**levels strings."""
    lines = [f'{indent}x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [
        f"{indent}x{level}: &a{level} [{','.join([f'*a{level - 1}'] * 9)}]"
        for level in range(1, levels)
    ]
    return lines


BOMB_IN_DEFAULTS = "\n".join(
    ["name: bomb", "defaults:", *billion_laughs(), "nodes:", "  n1: {extra_args: *a8}", ""]
)
# The anchors inside `nodes:` itself, each a node whose body is the one before, nine times.
BOMB_IN_NODES = "\n".join(
    [
        "name: bomb",
        "nodes:",
        '  n0: &n0 {kernel: /k, extra_args: ["-S","-S","-S","-S","-S","-S","-S","-S","-S"]}',
        *(
            f"  n{level}: &n{level} {{x: [{','.join([f'*n{level - 1}'] * 9)}]}}"
            for level in range(1, 9)
        ),
        "",
    ]
)
# Merge keys copied their anchor's pairs once per merge, exponentially, before PyYAML fixed
# yaml/pyyaml#897 (6.0.4 has the fix); pyproject allows any PyYAML>=6.0, so the count
# treats each merged alias as what it stands for.
BOMB_OF_MERGES = "\n".join(
    [
        "name: bomb",
        "defaults: &m0 {kernel: /k, memory: 256, cpus: 1, accel: tcg}",
        *(
            f"x{level}: &m{level} {{<<: [{', '.join([f'*m{level - 1}'] * 9)}], y{level}: 1}}"
            for level in range(1, 9)
        ),
        "nodes: {n1: *m8}",
        "",
    ]
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text", [BOMB_IN_DEFAULTS, BOMB_IN_NODES, BOMB_OF_MERGES], ids=["defaults", "nodes", "merges"]
)
def test_an_alias_bomb_is_refused_within_a_second_at_its_alias(text: str) -> None:
    assert len(text) < 1100  # about 1 KB that would expand to hundreds of millions of nodes
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        parse_topology_text(text, "bomb.yaml")
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    (issue,) = caught.value.issues
    assert issue.file == "bomb.yaml"
    assert issue.message == (
        f"too many aliases expanded (limit {MAX_ALIAS_NODES} nodes): a YAML alias bomb?"
    )
    # The line of the alias where the count passes the limit: level k repeats 9 * 9**k nodes.
    assert issue.line is not None
    assert "*" in text.splitlines()[issue.line - 1]


def test_the_bomb_is_blamed_on_the_level_where_it_passes_the_limit() -> None:
    # Level sizes 10, 91, 820, 7381, 66430: the aliases of levels 1-4 repeat 74,718 nodes
    # and level 5's third alias of level 4 passes 250,000.
    issue = only_issue(BOMB_IN_DEFAULTS)
    assert issue.line == line_of(BOMB_IN_DEFAULTS, "  x5:")


def lab_of(nodes: int, spines: int = 16) -> str:
    """A CLOS lab written as a user would: every node merges an anchor and shares its
    extra_args, each leaf has two uplinks."""
    lines = [
        "name: big",
        "defaults:",
        "  memory: 256",
        "  accel: tcg",
        "  kernel: /var/cache/qlink/guest/vmlinuz",
        "  initrd: /var/cache/qlink/guest/initrd.img",
        "nodes:",
    ]
    for index in range(nodes):
        name = f"spine{index + 1}" if index < spines else f"leaf{index - spines + 1}"
        if index == 0:
            lines += [
                f"  {name}: &node",
                "    cpus: 1",
                "    restart: on-failure",
                "    extra_args: &extra [-rtc, base=utc, -device, virtio-rng-pci]",
                f'    append: "console=ttyS0 qlink.name={name}"',
            ]
        else:
            lines += [
                f"  {name}:",
                "    <<: *node",
                f'    append: "console=ttyS0 qlink.name={name} qlink.ifprefix=swp"',
            ]
    lines.append("links:")
    for leaf in range(nodes - spines):
        for uplink in range(2):
            spine = (leaf + uplink) % spines + 1
            lines.append(f"  - [spine{spine}:swp{leaf + 1}, leaf{leaf + 1}:swp{51 + uplink}]")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(60)
def test_a_2000_node_lab_still_parses() -> None:
    text = lab_of(2000)
    started = time.perf_counter()
    lab = parse_topology_text(text, "big.yaml")
    elapsed = time.perf_counter() - started
    assert len(lab.nodes) == 2000
    assert len(lab.links) == 2 * (2000 - 16)
    assert lab.nodes["leaf7"].extra_args == ("-rtc", "base=utc", "-device", "virtio-rng-pci")
    assert elapsed < 10, f"took {elapsed:.2f} s"  # 0.25 s on the 2-core development machine


@pytest.mark.timeout(60)
def test_a_flood_of_nodes_is_refused_at_the_node_past_the_limit() -> None:
    items = ",".join(["a"] * MAX_YAML_NODES)
    text = f"name: x\nnodes:\n  a:\n    kernel: /k\n    extra_args: [{items}]\n"
    issue = only_issue(text)
    assert issue.line == 5
    assert issue.message == f"more than {MAX_YAML_NODES} YAML nodes, far more than any lab has"


@pytest.mark.parametrize("depth", [MAX_YAML_DEPTH, 900])
def test_deep_nesting_is_a_located_error_not_a_recursion_error(depth: int) -> None:
    # 900 levels used to raise RecursionError out of the parser (a crash, not a message).
    text = f"name: x\nnodes:\n  a: {{kernel: /k, extra_args: {'[' * depth}{']' * depth}}}\n"
    issue = only_issue(text)
    assert issue.line == 3
    assert issue.message == f"nested deeper than {MAX_YAML_DEPTH} levels"


def test_a_recursive_alias_is_a_config_error() -> None:
    issue = only_issue("name: x\nnodes:\n  a: {kernel: /k, extra_args: &r [*r]}\n")
    assert issue.line == 3
    assert "recursive" in issue.message


def test_an_integer_past_python_digit_limit_is_a_config_error() -> None:
    # Python refuses to convert decimal integers longer than 4,300 digits (ValueError).
    issue = only_issue(f"name: x\nnodes:\n  a: {{kernel: /k, memory: {'1' * 5000}}}\n")
    assert issue.line == 3
    assert "an integer of 5000 digits" in issue.message


def test_a_lone_surrogate_is_a_config_error() -> None:
    # The daemon parses text from JSON, where "\ud800" is a lone surrogate libyaml cannot take.
    issue = only_issue("name: x\nnodes:\n  a: {kernel: /k\ud800}\n")
    assert issue.line == 3
    assert "lone surrogate U+D800" in issue.message


def test_text_past_the_size_cap_is_refused_before_parsing() -> None:
    text = "name: x\n" + "#" * MAX_TOPOLOGY_BYTES + "\n"
    issue = only_issue(text)
    assert issue.line is None
    assert f"{len(text)} characters" in issue.message
    assert f"at most {MAX_TOPOLOGY_BYTES} bytes (4 MiB)" in issue.message
    multibyte = "name: x\n#" + "é" * (MAX_TOPOLOGY_BYTES // 2) + "\n"  # fewer characters
    assert "bytes: a topology file may be" in only_issue(multibyte).message


# --- reading the file -----------------------------------------------------------------------


def test_a_file_that_is_not_utf8_names_the_line_and_offset_of_the_bad_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lab.yaml"
    data = b"name: lab1\nnodes:\n  caf\xe9: {kernel: /k}\n"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        load_topology(path)
    (issue,) = caught.value.issues
    offset = data.index(b"\xe9")
    assert (issue.file, issue.line, issue.field) == (str(path), 3, "")
    assert issue.message == (
        f"not UTF-8: byte 0xe9 at byte offset {offset} (line 3, byte 6 of the line) "
        "cannot be decoded"
    )


def test_a_utf16_file_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_bytes("name: lab1\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"at byte offset 0 .*a UTF-16 file\? save it as UTF-8"):
        read_topology_text(path)


def test_a_file_past_the_size_cap_is_refused_with_its_size(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as file:
        file.truncate(MAX_TOPOLOGY_BYTES + 1)  # sparse: no need to write 4 MiB
    with pytest.raises(ConfigError) as caught:
        read_topology_text(path)
    (issue,) = caught.value.issues
    assert issue.file == str(path)
    assert issue.message == (
        f"{MAX_TOPOLOGY_BYTES + 1} bytes: a topology file may be at most {MAX_TOPOLOGY_BYTES} "
        "bytes (4 MiB)"
    )


def test_a_file_without_a_size_is_read_no_further_than_the_cap() -> None:
    with pytest.raises(ConfigError, match=r"/dev/zero: more than that: .* at most"):
        read_topology_text("/dev/zero")


def test_read_topology_text_returns_the_text(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("name: café\n", encoding="utf-8")
    assert read_topology_text(path) == "name: café\n"


def test_a_missing_file_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lab\.yaml: cannot read: .*No such file"):
        read_topology_text(tmp_path / "lab.yaml")


# --- extra_args -----------------------------------------------------------------------------


def refusal(args: list[str]) -> str:
    found = screen_extra_args(args)
    assert len(found) == 1, found
    index, message = found[0]
    assert index == 0
    return message


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        # qlink's own options, in both spellings QEMU takes
        (["-netdev", "user,id=x"], "an option qlink writes itself: every netdev is one of"),
        (["--netdev", "user,id=x"], "an option qlink writes itself: every netdev is one of"),
        (["-machine", "pc"], "qlink writes -machine from the `machine` field"),
        (["-M", "pc"], "QEMU reads it as -machine, an option qlink writes itself"),
        (["-enable-kvm"], "QEMU reads it as -accel"),
        (["-qmp", "unix:/tmp/q,server=on"], "QEMU reads it as -mon"),
        (["-monitor", "stdio"], "the VM's only monitor"),
        (["-no-reboot"], "QEMU reads it as -action"),
        (["-watchdog-action", "pause"], "QEMU reads it as -action"),
        (["-serial", "mon:stdio"], "-device isa-serial,chardev=ID"),
        (["-pidfile", "/tmp/p"], "re-adopts"),
        # -set and -global on what qlink owns
        (["-set", "chardev.qmp.path=/tmp/x"], "chardev qmp is qlink's, and -set would change it"),
        (["-set", "device.nic-swp1.mac=02:00:00:00:00:01"], "device nic-swp1 is qlink's"),
        (["-set", "mon.x.mode=readline"], "the mon options are qlink's"),
        (["-set", "machine.x.kernel=/k"], "the machine options are qlink's"),
        (["-set", "device.myrng.bus=qlink-br0"], "bus=qlink-br0 refers to one of qlink's own"),
        (["-set", "nonsense"], "-set takes GROUP.ID.PROPERTY=VALUE"),
        (["-global", "virtio-net-pci.host_mtu=9000"], "reaches qlink's own devices"),
        (["-global", "pci-device.rombar=0"], "a global on pci-device reaches"),
        (["-global", "driver=e1000,property=mac,value=x"], "a global on e1000 reaches"),
        (["-global", "pvpanic.events=0"], "a global on pvpanic reaches"),
        (
            ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"],
            "qlink hot-plugs NICs behind its PCI bridges",
        ),
        # what qlink cannot see into, or what takes the VM's control or process
        (["-readconfig", "lab.cfg"], "cannot see inside a config file"),
        (["-add-fd", "fd=3,set=2"], "no descriptors from qlink"),
        (["-incoming", "defer"], "migration stream"),
        (["-preconfig"], "wait for a QMP command"),
        (["-daemonize"], "fork away"),
        (["-chroot", "/srv"], "lose the sockets"),
        (["-gdb", "tcp::1234"], "debugger"),
        (["-s"], "TCP port 1234 for every VM"),
        (["-plugin", "/tmp/x.so"], "shared library"),
        (["-qtest", "unix:/tmp/q"], "qtest"),
        (["-compat", "deprecated-input=reject"], "QMP"),
        (["-vnc", ":0"], "host TCP port"),
        (["-no-acpi"], "ACPI"),
        (["-dump-vmstate", "/tmp/v.json"], "exit instead of running"),
        (["-version"], "exit instead of running"),
        (["-device", "help"], "asks QEMU for help"),
        (["-object", "rng-random,help"], "asks QEMU for help"),
        # -object: an allow-list
        (["-object", "filter-dump,id=f0,netdev=net-swp1,file=/tmp/d"], "a netfilter sits on"),
        (["-object", "filter-redirector,id=f1,netdev=x,queue=rx,outdev=c"], "a netfilter"),
        (["-object", '{"qom-type": "colo-compare", "id": "c0"}'], "colo-compare: it takes over"),
        (["-object", "input-linux,id=kbd,evdev=/dev/input/event0"], "host input device"),
        (["-object", "dbus-vmstate,id=d,addr=unix:path=/x"], "D-Bus"),
        (["-object", "main-loop,id=m"], "main-loop is not on qlink's allow-list"),
        (["-object", "{not json"], "not valid JSON"),
        # qlink's ids and places
        (["-device", "virtio-rng-pci,id=nic-swp9"], "id=nic-swp9: qlink uses that id"),
        (["-device", '{"driver": "virtio-rng-pci", "id": "qmp"}'], "id=qmp: qlink uses that id"),
        (["-chardev", "socket,id=console,path=/tmp/c"], "id=console: qlink uses that id"),
        (["-blockdev", "driver=raw,node-name=disk0,file=f"], "node-name=disk0"),
        (["-blockdev", "driver=raw,node-name=mine,file=disk0"], "file=disk0 refers to"),
        (["-drive", "if=none,id=mgmt-disk,file=/x"], "id=mgmt-disk: qlink uses that id"),
        (["-object", "iothread,id=qlink-io"], "id=qlink-io: qlink uses that id"),
        (["-device", "e1000,netdev=net-swp1"], "netdev=net-swp1: every netdev is one of"),
        (["-device", "isa-serial,chardev=console"], "chardev=console refers to"),
        (["-device", "virtio-rng-pci,bus=qlink-br2,addr=0x4"], "bus=qlink-br2 refers to"),
        (["-device", "virtio-rng-pci,bus=pcie.0,addr=0x5"], "pcie.0 slot 0x5 is qlink's"),
        (["-device", "virtio-rng-pci,addr=0x1e.0x1"], "pcie.0 slot 0x1e is qlink's"),
        (["-device", '{"driver": "virtio-rng-pci", "addr": 8}'], "pcie.0 slot 0x1 is qlink's"),
        (["-device", "pvpanic"], "qlink adds pvpanic itself"),
        (["-smbios", "type=11,value=io.systemd.credential:x=y"], "type 11 OEM strings"),
        (["-parallel", "mon:stdio"], "adds a monitor"),
        (["-debugcon", "chardev:qmp"], "chardev qmp is qlink's"),
        # not QEMU 7.2's options, or not as written
        (["-g", "800x600"], "not available on qemu-system-x86_64"),
        (["-writeconfig"], "-writeconfig is not an option of QEMU 7.2's qemu-system-x86_64"),
        (["-rtc=base=utc"], "write -rtc and its value separately"),
        (["-rtc base=utc"], "write -rtc and its value separately"),
        (["---rtc"], "---rtc is not an option"),
        (["base=utc"], "QEMU would open it as a disk image (-hda)"),
        ([""], "'' is not an option: QEMU would open it as a disk image"),
        (["-global", "x"], "-global takes DRIVER.PROPERTY=VALUE"),
        (["-rtc"], "-rtc takes a value, and nothing follows it"),
    ],
)
def test_extra_args_that_take_what_qlink_owns_are_refused_with_a_reason(
    args: list[str], reason: str
) -> None:
    message = refusal(args)
    assert reason in message
    assert message.removeprefix("'").startswith(args[0])


@pytest.mark.parametrize(
    "args",
    [
        ["-S"],  # paused before the first instruction, still under qlink's QMP
        ["-rtc", "base=utc", "-no-hpet"],
        ["--rtc", "base=localtime"],
        ["-device", "virtio-rng-pci", "-object", "rng-random,id=rng0,filename=/dev/urandom"],
        ["-device", "virtio-rng-pci,addr=0x1f.0x7"],  # not one of qlink's slots
        ["-device", '{"driver": "virtio-rng-pci", "id": "rng1"}'],
        ["-device", "virtio-rng-pci,id=rng0,bus=pcie.0"],
        ["-chardev", "socket,id=qga0,path=/tmp/qga.sock,server=on,wait=off"],
        ["-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=qga"],
        ["-device", "isa-serial,chardev=ser1"],
        ["-set", "device.rng0.max-bytes=1024"],
        ["-global", "ICH9-LPC.disable_s3=1", "-global", "kvm-pit.lost_tick_policy=discard"],
        ["-smbios", "type=1,serial=ABC123"],
        ["-blockdev", "driver=file,node-name=data0,filename=/tmp/d.img"],
        ["-drive", "if=virtio,file=/tmp/extra.qcow2"],
        ["-object", "iothread,id=io0", "-object", "memory-backend-ram,id=m0,size=1G"],
        ["-numa", "node,memdev=m0"],
        [],
        ["-loadvm", "base", "-snapshot", "-k", "de"],
        ["-D", "/tmp/qemu-debug.log", "-d", "guest_errors"],
        ["-device", "e1000"],  # a NIC with no netdev is the user's business
    ],
)
def test_extra_args_that_qlink_does_not_own_pass(args: list[str]) -> None:
    assert screen_extra_args(args) == []


def test_an_option_value_starting_with_a_dash_is_a_value_as_qemu_reads_it() -> None:
    # QEMU takes the item after an option with a value whatever it starts with: `-netdev`
    # here is -D's log file name, not an option.
    assert screen_extra_args(["-D", "-netdev", "-S"]) == []


def test_every_refusal_in_a_list_is_reported_at_its_item() -> None:
    found = screen_extra_args(["-rtc", "base=utc", "-daemonize", "-S", "stray", "-qmp", "x"])
    assert [index for index, _ in found] == [2, 4, 5]


def test_after_an_unknown_option_the_next_item_is_read_as_an_option() -> None:
    # Whether -writeconfig took a value is unknown, so what follows is screened on its own.
    found = screen_extra_args(["-writeconfig", "-daemonize"])
    assert [index for index, _ in found] == [0, 1]


def test_a_refusal_is_located_at_its_item_in_the_file() -> None:
    text = textwrap.dedent("""\
        name: lab1
        defaults:
          kernel: /boot/vmlinuz
          extra_args: [-readconfig, x.cfg]
        nodes:
          spine1:
            extra_args:
              - -rtc
              - base=utc
              - -set
              - chardev.qmp.path=/tmp/x
          leaf1: {}
        """)
    issues = issues_of(text)
    assert [(issue.line, issue.field) for issue in issues] == [
        (4, "defaults.extra_args[0]"),
        (10, "nodes.spine1.extra_args[2]"),
    ]
    assert issues[0].message.startswith("-readconfig x.cfg: qlink cannot see inside")
    assert issues[1].message == (
        "-set chardev.qmp.path=/tmp/x: chardev qmp is qlink's, and -set would change it"
    )


def qemu_option_table() -> list[tuple[str, bool, int]]:
    """tests/data/qemu-7.2-options.txt: (name, takes a value, target mask)."""
    rows = []
    for line in OPTIONS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, has_arg, arch = line.split()
            rows.append((name, has_arg == "1", int(arch, 16)))
    return rows


def verdict(name: str, takes_value: bool) -> str | None:
    """The screen's verdict on one option, with a value that names nothing of qlink's."""
    args = [f"-{name}"] + (["x"] if takes_value else [])
    found = screen_extra_args(args)
    if not found:
        return None
    ((index, message),) = found
    assert index == 0
    return message


# The options a user may give, as the screen stands: a change to it shows up here.
ACCEPTED = frozenset((
    "S", "acpitable", "async-teardown", "audio", "audiodev", "bios", "blockdev", "boot", "cdrom",
    "chardev", "d", "D", "debugcon", "device", "dfilter", "drive", "dtb", "echr",
    "enable-sync-profile", "fda", "fdb", "fsdev", "full-screen", "fw_cfg", "hda", "hdb", "hdc",
    "hdd", "icount", "iscsi", "k", "L", "loadvm", "mem-path", "mem-prealloc", "mtdblock",
    "no-fd-bootchk", "no-hpet", "numa", "only-migratable", "option-rom", "overcommit",
    "parallel", "pflash", "portrait", "rotate", "rtc", "sandbox", "sd", "seed", "singlestep",
    "smbios", "snapshot", "tpmdev", "trace", "usb", "usbdevice", "uuid", "vga", "virtfs",
    "win2k-hack",
))  # fmt: skip


def test_every_qemu_7_2_option_is_accepted_or_refused_with_a_reason() -> None:
    table = qemu_option_table()
    assert len(table) == 122
    x86 = {name: takes for name, takes, arch in table if arch & QEMU_ARCH_I386}
    other = {name: takes for name, takes, arch in table if not arch & QEMU_ARCH_I386}
    # The screen reads extra_args with QEMU 7.2's own table.
    assert dict(QEMU_OPTIONS) == x86
    assert dict(OTHER_TARGET_OPTIONS) == other
    accepted = set()
    for name, takes_value, _ in table:
        message = verdict(name, takes_value)
        if message is None:
            accepted.add(name)
            continue
        shown, _, reason = message.partition(": ")
        assert shown.split()[0] == f"-{name}", message
        assert len(reason) > 10, message
    assert accepted == ACCEPTED


def qlink_argvs() -> list[list[str]]:
    """qlink's own argv for every node of every golden config, without extra_args, under
    both accelerators."""
    argvs = []
    for source in sources():
        plan, _ = plan_lab(load_topology(source), Layout.under(Path("/r")))
        for node_plan in plan.nodes.values():
            for kvm in (False, True):
                argv = build_argv(node_plan, HostFacts(kvm_usable=kvm))
                argvs.append(argv[: len(argv) - len(node_plan.node.extra_args)])
    return argvs


def test_every_option_qlinks_argv_uses_is_refused() -> None:
    seen = set()
    for argv in qlink_argvs():
        for group in option_groups(argv):
            seen.add(option_name(group[0]))
            found = screen_extra_args(group)
            if group == ["-S"]:
                # The one exception: the file may pause a node with it, and then qlink's
                # start hold leaves its own out (tests/test_start_hold.py).
                assert found == []
                continue
            assert [index for index, _ in found] == [0], (group, found)
    # The golden configs cover every kind of option qlink writes.
    assert seen >= {
        "name", "nodefaults", "no-user-config", "display", "machine", "accel", "cpu", "smp",
        "m", "msg", "pidfile", "chardev", "mon", "serial", "device", "action", "kernel",
        "initrd", "append", "blockdev", "netdev", "smbios", "S",
    }  # fmt: skip


def test_every_id_in_qlinks_argv_is_reserved() -> None:
    for argv in qlink_argvs():
        for group in option_groups(argv):
            if len(group) < 2:
                continue
            for part in group[1].split(","):
                key, _, value = part.partition("=")
                if key in ("id", "node-name", "netdev", "chardev", "drive", "bus"):
                    assert value == ROOT_BUS or is_qlink_id(value), (group, part)
            if group[0] == "-serial":
                assert is_qlink_id(group[1].removeprefix("chardev:"))


def test_the_screen_agrees_with_the_plan_on_places_and_devices() -> None:
    assert SCREEN_ROOT_BUS == ROOT_BUS
    assert range(MGMT_SLOT, FIRST_BRIDGE_SLOT + BRIDGE_COUNT) == QLINK_ROOT_SLOTS
    assert all(is_qlink_id(bridge_id(index)) for index in range(BRIDGE_COUNT))
    for model in (*get_args(NicModel), "virtio-blk-pci", "pci-bridge", "pvpanic"):
        assert screen_extra_args(["-global", f"{model}.x=1"]), model
    assert qemu_opts("pvpanic") == "pvpanic"  # the one device qlink adds without an id


def local_qemu_version(binary: str) -> str:
    result = subprocess.run(
        [binary, "-version"], capture_output=True, text=True, check=True, timeout=30
    )
    match = re.search(r"version (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    return match.group(1)


@pytest.mark.qemu
def test_every_option_in_the_local_qemus_help_is_in_the_screens_table(qemu_binary: str) -> None:
    version = local_qemu_version(qemu_binary)
    require(version == "7.2", f"the screen's option table is QEMU 7.2's; this QEMU is {version}")
    help_text = subprocess.run(
        [qemu_binary, "-help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    names = {
        spelling.lstrip("-")
        for line in help_text.splitlines()
        if line.startswith("-")
        for spelling in line.split()[0].split("/")
    }
    assert len(names) > 100
    assert names <= set(QEMU_OPTIONS), names - set(QEMU_OPTIONS)
    for name in names:
        verdict(name, QEMU_OPTIONS[name])  # each gets one, without raising


@pytest.mark.qemu
def test_the_screen_reads_values_as_the_local_qemu_does(qemu_binary: str) -> None:
    """QEMU's first pass reads every option, taking values blindly, and exits at the first name
    it does not know: whether `-OPT -probe-a -probe-b` fails at a or at b says whether -OPT took
    -probe-a as its value. Nothing is started: QEMU exits before acting on any option."""
    version = local_qemu_version(qemu_binary)
    require(version == "7.2", f"the screen's option table is QEMU 7.2's; this QEMU is {version}")

    def takes_value(name: str) -> bool:
        result = subprocess.run(
            [qemu_binary, f"-{name}", "-qlink-probe-a", "-qlink-probe-b"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        assert result.returncode == 1, (name, result.stderr)
        failed_at = re.findall(r"-qlink-probe-([ab]): invalid option", result.stderr)
        assert len(failed_at) == 1, (name, result.stderr)
        return bool(failed_at[0] == "b")

    table = {**QEMU_OPTIONS, **OTHER_TARGET_OPTIONS}
    with ThreadPoolExecutor(max_workers=4) as pool:
        probed = dict(zip(table, pool.map(takes_value, table), strict=True))
    assert probed == table


# --- what QEMU cannot give a guest ----------------------------------------------------------


def node_text(fields: str, defaults: str = "") -> str:
    return f"name: x\ndefaults:\n  kernel: /k\n{defaults}nodes:\n  a: {{{fields}}}\n"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("cpus: 100000", "100000 vCPUs: QEMU 7.2's q35 takes at most 288"),
        ("cpus: 289, accel: kvm", "289 vCPUs: QEMU 7.2's q35 takes at most 288"),
        ("cpus: 256, accel: tcg", "256 vCPUs: QEMU 7.2 under TCG (no x2APIC) takes at most 255"),
        ("cpus: 256, machine: pc-q35-2.7", "256 vCPUs: QEMU's pc-q35-2.7 takes at most 255"),
        (
            "memory: 1000000000000",
            "1000000000000 MiB of RAM does not fit in the guest's 52-bit physical address space "
            "(4 PiB = 4294967296 MiB, the most an x86-64 CPU addresses)",
        ),
        (
            "memory: 1048576, accel: tcg",
            "1048576 MiB of RAM does not fit in the guest's 40-bit physical address space "
            "(1 TiB = 1048576 MiB, QEMU's default phys-bits for this CPU and accelerator)",
        ),
        ("memory: 2000000, accel: kvm, cpu: Skylake-Server", "40-bit physical address space"),
        ("memory: 20000000, accel: tcg, cpu: 'max,phys-bits=44'", "44-bit physical address"),
    ],
)
def test_resources_past_qemus_limits_are_refused_at_their_line(fields: str, message: str) -> None:
    issue = only_issue(node_text(fields))
    field = fields.partition(":")[0]
    assert (issue.line, issue.field) == (5, f"nodes.a.{field}")
    assert issue.message == message or message in issue.message


@pytest.mark.parametrize(
    "fields",
    [
        "cpus: 288, accel: kvm",
        "cpus: 288",  # auto may be KVM
        "cpus: 255, accel: tcg",
        "memory: 1048575, accel: tcg",
        "memory: 4000000, accel: kvm",  # -cpu host: the host's phys-bits decide
        "memory: 4000000, cpu: max",  # auto, max: the host's phys-bits under KVM
        "memory: 4000000, accel: tcg, cpu: 'max,phys-bits=46'",
    ],
)
def test_resources_within_qemus_limits_pass(fields: str) -> None:
    parse_topology_text(node_text(fields), "x.yaml")


def test_a_resource_set_in_defaults_is_blamed_there() -> None:
    issue = only_issue(node_text("accel: tcg", defaults="  cpus: 300\n"))
    assert (issue.line, issue.field) == (4, "defaults.cpus")
