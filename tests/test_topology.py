"""Every validation rule, each with a bad file: the error names the file, the line, the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlink.errors import ConfigError, ConfigIssue
from qlink.topology import load_topology, parse_topology_text

GOOD = """\
name: lab1
defaults:
  memory: 256
  kernel: /boot/vmlinuz
  initrd: /boot/initrd.img
nodes:
  spine1: {}
  leaf1: {memory: 1024}
  leaf2:
links:
  - [spine1:swp1, leaf1:swp51]
  - endpoints: [spine1:swp2, leaf2:swp51]
    ports: [8000, 9000]
"""


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_topology_text(textwrap.dedent(text), "lab.yaml")
    return list(caught.value.issues)


def only_issue(text: str) -> ConfigIssue:
    issues = issues_of(text)
    assert len(issues) == 1, issues
    return issues[0]


def test_good_file_resolves_defaults_and_both_link_forms() -> None:
    lab = parse_topology_text(GOOD, "lab.yaml")
    assert lab.name == "lab1"
    assert lab.nodes["spine1"].memory == 256
    assert lab.nodes["leaf1"].memory == 1024
    assert lab.nodes["leaf2"].kernel == "/boot/vmlinuz"
    assert lab.nodes["leaf2"].restart == "on-failure"
    assert [str(end) for end in lab.links[0].endpoints] == ["spine1:swp1", "leaf1:swp51"]
    assert lab.links[1].ports == (8000, 9000)
    assert lab.interfaces("spine1") == ["swp1", "swp2"]


def test_unknown_node_in_a_link() -> None:
    issue = only_issue(GOOD.replace("[spine1:swp1, leaf1:swp51]", "[spine1:swp1, leaf9:swp51]"))
    assert (issue.file, issue.line, issue.field) == ("lab.yaml", 11, "links[0].endpoints[1]")
    assert "unknown node 'leaf9'" in issue.message


def test_interface_used_by_two_links() -> None:
    issue = only_issue(GOOD.replace("[spine1:swp2, leaf2:swp51]", "[spine1:swp1, leaf2:swp51]"))
    assert issue.line == 12
    assert issue.field == "links[1].endpoints[0]"
    assert "spine1:swp1 is already used by links[0].endpoints[0]" in issue.message


def test_same_udp_port_twice() -> None:
    text = GOOD + "  - endpoints: [leaf1:swp1, leaf2:swp1]\n    ports: [9000, 9001]\n"
    issue = only_issue(text)
    assert (issue.line, issue.field) == (15, "links[2].ports[0]")
    assert "UDP port 9000 is already used by links[1].ports[1]" in issue.message


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range(port: int) -> None:
    issue = only_issue(GOOD.replace("ports: [8000, 9000]", f"ports: [8000, {port}]"))
    assert (issue.line, issue.field) == (13, "links[1].ports[1]")
    assert "65535" in issue.message or "greater than or equal to 1" in issue.message


@pytest.mark.parametrize(
    ("bad_name", "quoted"),
    [("spine,1", "'spine,1'"), ("spine/1", "'spine/1'"), ("spine 1", "'spine 1'"), ("", "''")],
)
def test_bad_node_name(bad_name: str, quoted: str) -> None:
    text = GOOD.replace("  leaf2:\n", f"  {quoted}: {{}}\n")
    issue = only_issue(text)
    assert issue.line == 9
    assert issue.field.startswith("nodes")
    assert "bad node name" in issue.message


@pytest.mark.parametrize("bad", ["swp,1", "swp/1", "swp 1"])
def test_bad_interface_name(bad: str) -> None:
    issue = only_issue(GOOD.replace("[spine1:swp1, leaf1:swp51]", f"['spine1:{bad}', leaf1:swp51]"))
    assert (issue.line, issue.field) == (11, "links[0].endpoints[0].interface")
    assert "bad interface name" in issue.message


def test_endpoint_without_colon() -> None:
    issue = only_issue(GOOD.replace("[spine1:swp1, leaf1:swp51]", "[spine1, leaf1:swp51]"))
    assert (issue.line, issue.field) == (11, "links[0].endpoints[0]")
    assert "node:interface" in issue.message


def test_interface_name_longer_than_a_linux_ifname() -> None:
    issue = only_issue(GOOD.replace("leaf1:swp51]", "leaf1:a-very-long-ifname]"))
    assert "longer than 15" in issue.message


@pytest.mark.parametrize("bad", ["Lab1", "lab_1", "lab 1", "-lab"])
def test_bad_lab_name(bad: str) -> None:
    issue = only_issue(GOOD.replace("name: lab1", f"name: '{bad}'"))
    assert (issue.line, issue.field) == (1, "name")
    assert "bad lab name" in issue.message


def test_unknown_field() -> None:
    issue = only_issue(GOOD.replace("leaf1: {memory: 1024}", "leaf1: {memory: 1024, ram: 2}"))
    assert (issue.line, issue.field, issue.message) == (8, "nodes.leaf1.ram", "unknown field")


def test_unknown_top_level_field() -> None:
    issue = only_issue(GOOD + "lnks: []\n")
    assert (issue.line, issue.field, issue.message) == (14, "lnks", "unknown field")


def test_neither_kernel_nor_image() -> None:
    text = GOOD.replace("  kernel: /boot/vmlinuz\n  initrd: /boot/initrd.img\n", "")
    issues = issues_of(text)
    assert {(issue.line, issue.field) for issue in issues} == {
        (5, "nodes.spine1"),
        (6, "nodes.leaf1"),
        (7, "nodes.leaf2"),
    }
    assert all("needs `kernel`" in issue.message for issue in issues)


def test_both_kernel_and_image() -> None:
    issue = only_issue(GOOD.replace("leaf1: {memory: 1024}", "leaf1: {image: /x.qcow2}"))
    assert (issue.line, issue.field) == (8, "nodes.leaf1")
    assert "not both" in issue.message


@pytest.mark.parametrize(("field", "value"), [("memory", 0), ("memory", -5), ("cpus", 0)])
def test_memory_and_cpus_must_be_positive(field: str, value: int) -> None:
    issue = only_issue(GOOD.replace("leaf1: {memory: 1024}", f"leaf1: {{{field}: {value}}}"))
    assert (issue.line, issue.field) == (8, f"nodes.leaf1.{field}")
    assert "greater than 0" in issue.message


def test_wrong_type_is_located() -> None:
    issue = only_issue(GOOD.replace("memory: 256", "memory: lots"))
    assert (issue.line, issue.field) == (3, "defaults.memory")


def test_extra_args_may_not_touch_owned_options() -> None:
    issue = only_issue(GOOD.replace("leaf1: {memory: 1024}", "leaf1: {extra_args: [-netdev, x]}"))
    assert (issue.line, issue.field) == (8, "nodes.leaf1.extra_args[0]")
    assert issue.message.startswith("-netdev x: an option qlink writes itself")


def test_extra_args_that_qlink_does_not_own_are_kept() -> None:
    lab = parse_topology_text(
        GOOD.replace("leaf1: {memory: 1024}", "leaf1: {extra_args: [-rtc, base=utc]}"), "f"
    )
    assert lab.nodes["leaf1"].extra_args == ("-rtc", "base=utc")


def test_machine_outside_q35_family_is_refused() -> None:
    issue = only_issue(GOOD.replace("memory: 256", "memory: 256\n  machine: pc"))
    assert (issue.line, issue.field) == (4, "defaults.machine")
    assert "q35" in issue.message


def test_duplicate_node_key_is_an_error_not_an_override() -> None:
    issue = only_issue(GOOD.replace("  leaf2:\n", "  leaf1: {}\n"))
    assert issue.line == 9
    assert "not valid YAML" in issue.message


def test_duplicate_key_names_both_lines() -> None:
    issue = only_issue(GOOD.replace("  leaf2:\n", "  leaf1: {}\n"))
    assert "duplicate key 'leaf1' (first on line 8)" in issue.message


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("name: lab1\ndefaults: {memory: 256, memory: 512}\n", 2,
         "duplicate key 'memory' (first on line 2)"),
        ("name: lab1\n? [a, b]\n: 1\n", 2, "a mapping key must be a plain value"),
        ("name: lab1\ndefaults: {<<: {[a]: 1}}\n", 2, "a mapping key must be a plain value"),
        ("name: lab1\ndefaults: {<<: 1}\n", 2, "expected a mapping or list of mappings"),
        ("name: lab1\nnodes: " + "[" * 2000 + "]" * 2000 + "\n", 2, "nesting depth"),
    ],
)  # fmt: skip
def test_yaml_that_cannot_be_a_mapping_is_located(text: str, line: int, message: str) -> None:
    issue = only_issue(text)
    assert issue.line == line
    assert issue.message.startswith("not valid YAML: ")
    assert message in issue.message


def test_yaml_1_2_core_schema_not_1_1() -> None:
    """`on`, `no`, `yes` are names, a date-like lab name is a name and `0256` is decimal: what
    YAML 1.1 (PyYAML's own resolvers) would turn into booleans, a date and octal 174."""
    text = textwrap.dedent("""\
        name: 2024-01-01
        defaults: {kernel: /boot/vmlinuz, memory: 0256, cpus: 0x2}
        nodes: {on: {}, no: {}, yes: {}}
        links:
          - [on:eth1, no:eth1]
          - [no:eth2, yes:eth1]
    """)
    lab = parse_topology_text(text, "lab.yaml")
    assert lab.name == "2024-01-01"
    assert sorted(lab.nodes) == ["no", "on", "yes"]
    assert (lab.nodes["on"].memory, lab.nodes["on"].cpus) == (256, 2)


def test_merge_keys_share_settings_and_own_keys_win() -> None:
    text = textwrap.dedent("""\
        name: lab1
        nodes:
          spine1: &switch {kernel: /boot/vmlinuz, memory: 512}
          spine2: {<<: *switch, memory: 1024}
          leaf1:
            <<: *switch
            cpu: 2
        links: []
    """)
    issue = only_issue(text)
    assert (issue.line, issue.field) == (7, "nodes.leaf1.cpu")  # the merged node is located
    lab = parse_topology_text(text.replace("cpu: 2", "cpus: 2"), "lab.yaml")
    assert [lab.nodes[name].memory for name in ("spine1", "spine2", "leaf1")] == [512, 1024, 512]


def test_a_character_yaml_forbids_is_a_config_error() -> None:
    issue = only_issue("name: lab1\x00\n")
    assert "not valid YAML" in issue.message


def test_not_yaml_at_all() -> None:
    issue = only_issue("name: [unclosed\n")
    assert issue.line is not None
    assert "not valid YAML" in issue.message


def test_several_issues_are_all_reported_in_line_order() -> None:
    text = GOOD.replace("memory: 256", "memory: 0").replace(
        "leaf1: {memory: 1024}", "leaf1: {x: 1}"
    )
    issues = issues_of(text)
    assert [issue.line for issue in issues] == [3, 8]


def test_missing_kernel_file_is_blamed_where_it_is_written(tmp_path: Path) -> None:
    topology = tmp_path / "lab.yaml"
    topology.write_text(GOOD)
    with pytest.raises(ConfigError) as caught:
        load_topology(topology, file_exists=lambda path: path != "/boot/vmlinuz")
    (issue,) = caught.value.issues
    assert (issue.line, issue.field) == (4, "defaults.kernel")
    assert "no such file: /boot/vmlinuz" in issue.message


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    topology = tmp_path / "lab.yaml"
    topology.write_text(GOOD.replace("/boot/vmlinuz", "guest/vmlinuz"))
    lab = load_topology(topology)
    assert lab.nodes["spine1"].kernel == str(tmp_path / "guest" / "vmlinuz")


def test_unreadable_file_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lab\.yaml: cannot read"):
        load_topology(tmp_path / "lab.yaml")


def test_error_text_reads_file_line_field_message() -> None:
    issue = only_issue(GOOD.replace("memory: 256", "memory: 0"))
    assert str(issue) == "lab.yaml:3: defaults.memory: Input should be greater than 0"


# YAML's own punctuation, and the pieces of a topology, so that mutations reach past the parser.
_YAML_PIECES = st.sampled_from(
    [":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "?", "&a", "*a", "<<", "!!int", "#",
     "'", '"', "|", ">", "---", "~", "name", "nodes", "links", "defaults", "kernel", "memory",
     "lab1", "spine1", "leaf1:swp1", "0x10", "1e3", ".inf", "on", "\t", "\x00", "[a]: 1",
     "{[a]: 1}", "? [a]\n: 1\n", "{a: 1, a: 2}", "&m {x: 1}", "<<: *m"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=len(GOOD)), max_size=4),
    st.lists(st.lists(_YAML_PIECES, max_size=6).map("".join), min_size=4, max_size=4),
)
def test_any_text_is_a_lab_or_a_config_error(cuts: list[int], pieces: list[str]) -> None:
    """What the daemon parses comes from a client: whatever it is, the answer is a lab or a
    ConfigError with a message, never another exception (which would be a 500, not an error
    that names the line)."""
    text = GOOD
    for cut, piece in zip(cuts, pieces, strict=False):
        text = text[:cut] + piece + text[cut:]
    issues: list[ConfigIssue] = []
    try:
        parse_topology_text(text, "lab.yaml")
    except ConfigError as error:
        issues = list(error.issues)
    assert all(issue.message for issue in issues)


def test_a_tilde_of_an_unknown_user_stays_a_literal_path() -> None:
    """Found by the test above: `~:` made pathlib raise (no such user), a 500 from the API."""
    lab = parse_topology_text(
        "name: t\nnodes:\n  a: {kernel: '~no-such-user-qlink/vmlinuz'}\n", "/labs/lab.yaml"
    )
    assert lab.nodes["a"].kernel == "/labs/~no-such-user-qlink/vmlinuz"
