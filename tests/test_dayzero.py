"""Day-0 documents: templates per node, vars precedence, located errors, valid YAML, meta-data."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qlink.dayzero import (
    MAX_DOCUMENT_CHARS,
    Interface,
    Location,
    NodeFacts,
    Origin,
    Seed,
    Source,
    merge_vars,
    render_seed,
    render_text,
)
from qlink.errors import ConfigError, ConfigIssue

LEAF1 = NodeFacts(
    lab="clos",
    node="leaf1",
    # Given out of order: templates see them in position order.
    interfaces=(
        Interface("swp52", "52:54:00:aa:00:34", "spine2", "swp1", 52),
        Interface("swp51", "52:54:00:aa:00:33", "spine1", "swp1", 51),
    ),
    vars={"asn": 65101, "loopback": "10.0.0.11"},
)
FROM_FILE = Origin(
    "lab.yaml", 7, "defaults.cloud_init", template_file="/labs/clos/frr-user-data.yaml"
)
INLINE = Origin("lab.yaml", 4, "defaults.cloud_init")

FRR_USER_DATA = """\
#cloud-config
hostname: {{ node }}
write_files:
  - path: /etc/frr/frr.conf
    content: |
      frr defaults datacenter
      hostname {{ node }}
      router bgp {{ vars.asn }}
       bgp router-id {{ vars.loopback }}
      {% for interface in interfaces %}
       neighbor {{ interface.name }} interface remote-as external
      {% endfor %}
"""


def seed_of(content: str | dict[str, Any], facts: NodeFacts = LEAF1) -> Seed:
    origin = INLINE if isinstance(content, dict) else FROM_FILE
    return render_seed(facts, Source(content, origin))


def issues_of(
    facts: NodeFacts, user_data: Source, network: Source | None = None
) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        render_seed(facts, user_data, network)
    return list(caught.value.issues)


def only_issue(content: str | dict[str, Any], origin: Origin = FROM_FILE) -> ConfigIssue:
    issues = issues_of(LEAF1, Source(content, origin))
    assert len(issues) == 1, issues
    return issues[0]


def test_an_frr_config_gets_one_neighbor_per_interface_in_position_order() -> None:
    seed = seed_of(FRR_USER_DATA)
    config = yaml.safe_load(seed.user_data)
    assert seed.user_data.startswith("#cloud-config\n")
    assert config["hostname"] == "leaf1"
    assert config["write_files"][0]["content"] == textwrap.dedent("""\
        frr defaults datacenter
        hostname leaf1
        router bgp 65101
         bgp router-id 10.0.0.11
         neighbor swp51 interface remote-as external
         neighbor swp52 interface remote-as external
        """)


def test_every_interface_fact_reaches_the_template() -> None:
    text = (
        "#!/bin/sh\n"
        "{% for i in interfaces %}"
        "{{ i.position }} {{ i.name }} {{ i.mac }} {{ i.peer_node }}:{{ i.peer_interface }}\n"
        "{% endfor %}"
        "{{ lab }}\n"
    )
    assert seed_of(text).user_data == (
        "#!/bin/sh\n"
        "51 swp51 52:54:00:aa:00:33 spine1:swp1\n"
        "52 swp52 52:54:00:aa:00:34 spine2:swp1\n"
        "clos\n"
    )


def test_one_block_serves_many_nodes() -> None:
    spine1 = NodeFacts(
        "clos", "spine1", (Interface("swp1", "52:54:00:bb:00:01", "leaf1", "swp51", 1),)
    )
    block = {"hostname": "{{ node }}", "runcmd": ["echo {{ interfaces | length }} ports"]}
    assert yaml.safe_load(seed_of(block, spine1).user_data) == {
        "hostname": "spine1",
        "runcmd": ["echo 1 ports"],
    }
    assert yaml.safe_load(seed_of(block).user_data)["hostname"] == "leaf1"


def test_a_node_var_overrides_the_default_one_key_at_a_time() -> None:
    merged = merge_vars(
        {"asn": 65000, "bgp": {"timers": [3, 9], "multipath": True}, "site": "lab"},
        {"asn": 65101, "bgp": {"timers": [1, 3]}},
    )
    # One level deep, as node fields merge: `bgp` is replaced whole, not merged.
    assert merged == {"asn": 65101, "bgp": {"timers": [1, 3]}, "site": "lab"}
    assert merge_vars(None, {"a": 1}) == {"a": 1}
    assert merge_vars({"a": 1}, None) == {"a": 1}
    facts = NodeFacts("clos", "leaf1", (), merged)
    assert seed_of(
        "#cloud-config\nx: {{ vars.asn }}-{{ vars.site }}-{{ vars.bgp.timers[0] }}\n", facts
    ).user_data == ("#cloud-config\nx: 65101-lab-1\n")


def test_vars_dot_name_is_the_variable_even_when_named_like_a_dict_method() -> None:
    facts = NodeFacts("clos", "leaf1", (), {"items": "a", "keys": "b", "get": "c"})
    text = (
        "#cloud-config\n"
        "x: {{ vars.items }}{{ vars['keys'] }}{{ vars.get }}\n"
        "y: {{ vars | dictsort | length }}\n"
    )
    assert seed_of(text, facts).user_data == "#cloud-config\nx: abc\ny: 3\n"


def test_an_optional_var_can_be_tested_or_defaulted() -> None:
    text = (
        "#cloud-config\n"
        "a: {{ vars.mtu | default(1500) }}\n"
        "{% if vars.asn is defined %}\nb: {{ vars.asn }}\n{% endif %}\n"
        "{% if vars.nope is defined %}\nc: 1\n{% endif %}\n"
    )
    assert seed_of(text).user_data == "#cloud-config\na: 1500\nb: 65101\n"


# --- errors ----------------------------------------------------------------------------------


def test_an_unknown_variable_names_itself_the_field_and_the_line_in_the_template() -> None:
    issue = only_issue("#cloud-config\nhostname: {{ node }}\nasn: {{ vars.asm }}\n")
    assert (issue.file, issue.line, issue.field) == ("lab.yaml", 7, "defaults.cloud_init")
    assert issue.message.startswith(
        "line 3 of /labs/clos/frr-user-data.yaml: vars.asm is undefined"
    )
    assert "(vars has: asn, loopback)" in issue.message
    assert "for node leaf1" in issue.message


@pytest.mark.parametrize(
    ("template", "line", "words"),
    [
        (
            "#cloud-config\n\n{{ hostnme }}\n",
            3,
            "'hostnme' is undefined (a template knows: node, lab, interfaces, vars)",
        ),
        (
            "#cloud-config\n{% for i in interfaces %}\n{{ i.speed }}\n{% endfor %}\n",
            3,
            "an interface has no 'speed'",
        ),
        (
            "#cloud-config\na: 1\n{% for i in interfaces %}\n",
            3,
            "template syntax: Unexpected end of template",
        ),
        ("#cloud-config\na: {{ node }\n", 2, "template syntax: unexpected '}'"),
        ("#cloud-config\na: {{ 1 // 0 }}\n", 2, "ZeroDivisionError"),
        (
            "#cloud-config\na: {{ vars.loopback.nope.deeper }}\n",
            2,
            "'str object' has no attribute 'nope'",
        ),
    ],
)
def test_template_errors_are_located(template: str, line: int, words: str) -> None:
    issue = only_issue(template)
    assert issue.message.startswith(f"line {line} of /labs/clos/frr-user-data.yaml: "), issue
    assert words in issue.message


def test_an_inline_error_names_the_path_inside_the_field_and_its_line() -> None:
    lines: dict[Location, int] = {("write_files", 0, "content"): 9}
    origin = Origin("lab.yaml", 4, "nodes.leaf1.cloud_init", line_of=lines.get)
    content = {"write_files": [{"path": "/etc/motd", "content": "hi\n{{ vars.motd }}\n"}]}
    issue = only_issue(content, origin)
    assert (issue.line, issue.field) == (9, "nodes.leaf1.cloud_init.write_files[0].content")
    assert issue.message.startswith("line 2 of the template: vars.motd is undefined")
    # Without lines for the path, the field's own line.
    assert only_issue(content, INLINE).line == 4


def test_every_error_of_a_node_comes_at_once() -> None:
    network = Source(
        "version: 2\nethernets: {{ vars.nics }}\n", Origin("lab.yaml", 5, "defaults.network_config")
    )
    issues = issues_of(LEAF1, Source({"a": "{{ x }}", "b": "{{ y }}"}, INLINE), network)
    assert [(issue.field, issue.message.split(" is undefined")[0]) for issue in issues] == [
        ("defaults.cloud_init.a", "line 1 of the template: 'x'"),
        ("defaults.cloud_init.b", "line 1 of the template: 'y'"),
        ("defaults.network_config", "line 2 of the template: vars.nics"),
    ]


def test_render_text_raises_a_located_error_too() -> None:
    assert render_text("{{ node }}.{{ lab }}", LEAF1, INLINE) == "leaf1.clos"
    with pytest.raises(
        ConfigError, match=r"lab.yaml:4: defaults.cloud_init: line 1 of the template"
    ):
        render_text("{{ nope }}", LEAF1, INLINE)


# --- YAML stays YAML ---------------------------------------------------------------------------

AWKWARD = [
    "it's",
    'say "hi"',
    "a: b",
    "# not a comment",
    "- not a list",
    "{not: flow}",
    "[1, 2]",
    "yes",
    "0644",
    "~",
    "  leading and trailing  ",
    "line one\nline two\n",
    "trailing spaces \nsecond",
    "x\nruncmd: [reboot]",
    "tab\there",
    "snow ☃ and 中文",
    "*alias",
    "&anchor",
    "!!python/object:os.system",
    "%TAG",
    "@reserved",
    "",
]


@pytest.mark.parametrize("value", AWKWARD)
def test_an_inline_value_stays_one_yaml_value_whatever_it_holds(value: str) -> None:
    facts = NodeFacts("clos", "leaf1", (), {"text": value})
    seed = seed_of(
        {"write_files": [{"path": "/x", "content": "{{ vars.text }}"}], "plain": value}, facts
    )
    assert yaml.safe_load(seed.user_data) == {
        "write_files": [{"path": "/x", "content": value}],
        "plain": value,
    }


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_var_text_renders_to_exactly_that_value(value: str) -> None:
    facts = NodeFacts("clos", "leaf1", (), {"text": value})
    seed = seed_of({"motd": "{{ vars.text }}", "list": ["{{ vars.text }}"]}, facts)
    assert yaml.safe_load(seed.user_data) == {"motd": value, "list": [value]}


def test_inline_user_data_gets_the_header_and_keeps_non_text_values() -> None:
    seed = seed_of(
        {
            "package_update": True,
            "swap": {"size": 0},
            "ntp": None,
            "write_files": [
                {"path": "/etc/frr/daemons", "permissions": "0644", "content": "bgpd=yes\n"}
            ],
        }
    )
    assert seed.user_data == textwrap.dedent("""\
        #cloud-config
        package_update: true
        swap:
          size: 0
        ntp: null
        write_files:
        - path: /etc/frr/daemons
          permissions: '0644'
          content: |
            bgpd=yes
        """)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "#cloud-config\nmotd: {{ vars.loopback }}: up\n",
            "not valid YAML at line 2 of the rendered text",
        ),
        ("#cloud-config\n- a list\n", "must be a YAML mapping once rendered, not a list"),
        (
            "hostname: leaf1\n",
            "cloud-init would ignore this user-data: its first line must be #cloud-config",
        ),
    ],
)
def test_user_data_text_cloud_init_would_reject_is_an_error(text: str, words: str) -> None:
    assert words in only_issue(text).message


def test_other_kinds_of_user_data_are_rendered_but_not_read_as_yaml() -> None:
    assert (
        seed_of("#!/bin/sh\necho {{ node }}: {{ lab }}\n").user_data
        == "#!/bin/sh\necho leaf1: clos\n"
    )


def test_cloud_init_jinja_user_data_is_left_to_cloud_init() -> None:
    text = "## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n"
    assert seed_of(text).user_data == text


def test_network_config_is_rendered_without_a_header() -> None:
    network = {
        "version": 2,
        "ethernets": {"mgmt": {"match": {"macaddress": "{{ interfaces[0].mac }}"}, "dhcp4": True}},
    }
    seed = render_seed(
        LEAF1, None, Source(network, Origin("lab.yaml", 3, "defaults.network_config"))
    )
    assert seed.user_data == "#cloud-config\n"
    assert seed.network_config is not None
    assert yaml.safe_load(seed.network_config)["ethernets"]["mgmt"]["match"] == {
        "macaddress": "52:54:00:aa:00:33"
    }
    text = Source("version: 2\nethernets: [{{ node }}]\n", Origin("lab.yaml", 3, "x"))
    assert render_seed(LEAF1, None, text).network_config == "version: 2\nethernets: [leaf1]\n"
    issue = issues_of(LEAF1, Source("#cloud-config\n", INLINE), Source("- 1\n", INLINE))[0]
    assert "must be a YAML mapping" in issue.message


# --- meta-data and the digest ----------------------------------------------------------------


def test_meta_data_names_the_node_and_an_instance_id_that_follows_the_content() -> None:
    seed = seed_of(FRR_USER_DATA)
    meta = yaml.safe_load(seed.meta_data)
    assert set(meta) == {"instance-id", "local-hostname"}
    assert meta["local-hostname"] == "leaf1"
    assert meta["instance-id"].startswith("leaf1-")
    # The same settings: the same id (a restart is a reboot of the same instance).
    assert seed_of(FRR_USER_DATA) == seed
    # New user-data or network-config, another node or lab: another id (day 0 runs again).
    ids = {
        meta["instance-id"],
        yaml.safe_load(seed_of(FRR_USER_DATA + "# edited\n").meta_data)["instance-id"],
        yaml.safe_load(
            seed_of(
                FRR_USER_DATA, NodeFacts("clos", "leaf2", LEAF1.interfaces, LEAF1.vars)
            ).meta_data
        )["instance-id"],
        yaml.safe_load(
            seed_of(
                FRR_USER_DATA, NodeFacts("clos2", "leaf1", LEAF1.interfaces, LEAF1.vars)
            ).meta_data
        )["instance-id"],
        yaml.safe_load(
            render_seed(
                LEAF1, Source(FRR_USER_DATA, FROM_FILE), Source("version: 2\n", INLINE)
            ).meta_data
        )["instance-id"],
    }
    assert len(ids) == 5


def test_a_var_change_changes_the_seed_only_where_the_template_uses_it() -> None:
    other_vars = NodeFacts("clos", "leaf1", LEAF1.interfaces, {**LEAF1.vars, "unused": 1})
    assert seed_of(FRR_USER_DATA, other_vars) == seed_of(FRR_USER_DATA)
    new_asn = NodeFacts("clos", "leaf1", LEAF1.interfaces, {**LEAF1.vars, "asn": 65102})
    assert seed_of(FRR_USER_DATA, new_asn).digest != seed_of(FRR_USER_DATA).digest


def test_the_digest_covers_all_three_documents() -> None:
    base = Seed("#cloud-config\n", "instance-id: a\n", None)
    digests = {
        base.digest,
        Seed("#cloud-config\n ", "instance-id: a\n", None).digest,
        Seed("#cloud-config\n", "instance-id: b\n", None).digest,
        Seed("#cloud-config\n", "instance-id: a\n", "").digest,
        # Text moved from one document to the next is another seed.
        Seed("#cloud-config", "\ninstance-id: a\n", None).digest,
    }
    assert len(digests) == 5
    assert base.digest == Seed("#cloud-config\n", "instance-id: a\n").digest
    assert list(base.files()) == ["user-data", "meta-data"]
    assert list(Seed("u", "m", "n").files()) == ["user-data", "meta-data", "network-config"]


# --- the sandbox -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("''.__class__.__mro__", "access to attribute '__class__' of 'str' object is unsafe"),
        ("node.__init__.__globals__", "is unsafe"),
        ("vars.loopback.format.__globals__", "is unsafe"),
        ("dict(a=1).update(b=2)", "is unsafe"),
        ("interfaces.append(1)", "has no attribute 'append'"),
        ("namespace()", "'namespace' is undefined"),
        ("lipsum(1000000)", "'lipsum' is undefined"),
        ("'x' * 100000000", "would make a value too large"),
        ("[1] * 100000000", "would make a value too large"),
        ("9 ** 99999", "would make a value too large"),
        ("range(10**6) | list", "range() gave more than"),
    ],
)
def test_a_template_cannot_reach_the_host_nor_grow_without_bound(
    expression: str, words: str
) -> None:
    issue = only_issue(f"#cloud-config\na: {{{{ {expression} }}}}\n")
    assert words in issue.message, issue.message


def test_nested_ranges_share_one_budget() -> None:
    loops = (
        "#!/bin/sh\n{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}"
    )
    assert "range() gave more than" in only_issue(loops).message
    assert seed_of(
        "#!/bin/sh\n{% for a in range(300) %}{% for b in range(300) %}{% endfor %}{% endfor %}"
    )


def test_the_rendered_text_is_bounded_while_it_streams() -> None:
    line = "x" * 1000
    template = (
        "#!/bin/sh\n"
        "{% for a in range(100) %}{% for b in range(100) %}"
        f"{line}\n"
        "{% endfor %}{% endfor %}"
    )
    assert MAX_DOCUMENT_CHARS < 100 * 100 * 1001
    assert f"passed {MAX_DOCUMENT_CHARS} characters" in only_issue(template).message
