"""The topology file's YAML: YAML 1.2 through libyaml, every line kept, the document bounded.

`load_document` turns text into mappings and sequences that remember the line of each key and
item (`Positions` finds the line of a field path in them), or raises a ConfigError naming the
file and the line. It knows nothing of what a topology holds: that is `topology.py`'s.

libyaml (PyYAML's `CSafeLoader`) scans and parses; PyYAML's composer, in Python, builds the
nodes from libyaml's events, because only a composer in Python can count what the document
holds as it is built (`_BoundedComposer`). The resolvers and constructors are YAML 1.2's core
schema, as the format promises, not PyYAML's YAML 1.1 ones (`_TopologyLoader`).

The file may come from anyone who can reach the control socket, so composing is bounded: the
YAML nodes the document composes, the nodes its aliases repeat (a 1 KB "billion laughs"
expands to a billion) and its nesting all have fixed limits far above any real lab.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent

from qlink.errors import ConfigError, ConfigIssue

Location = tuple[str | int, ...]
"""A path into the document, as pydantic writes one: `("links", 0, "endpoints", 1)`."""

# Bounds on parsing. A 2,000-node lab (tests/test_hardening_parse.py builds one) is some
# 330 KB, composes about 22,000 YAML nodes and, with every node merging a shared anchor,
# repeats about 26,000 more through aliases: the limits leave ten times that room.
MAX_YAML_NODES = 250_000
"""Nodes the document may compose: memory is about 700 bytes each while parsing."""
MAX_ALIAS_NODES = 250_000
"""Nodes aliases may repeat: each alias counts the whole subtree of its anchor, which is what
pydantic and the plan would otherwise walk (nine aliases of nine aliases... is exponential)."""
MAX_YAML_DEPTH = 64
"""Nesting a lab never needs (it uses 5). Past about 900 levels, constructing the document
ran out of Python's recursion (a RecursionError, not a message)."""


class _Mapping(dict[Any, Any]):
    """A YAML mapping that knows the line of each of its keys."""

    __slots__ = ("lines",)
    lines: dict[Any, int]


class _Sequence(list[Any]):
    """A YAML sequence that knows the line of each of its items."""

    __slots__ = ("lines",)
    lines: list[int]


try:
    # libyaml's parser, which PyYAML's wheels carry: ruamel.yaml (pure Python since 0.19)
    # took 0.6 s to parse a 200-node lab, some 8% of bringing it up; libyaml takes 0.03 s.
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # a PyYAML built without libyaml: the same, in Python
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _TooBig(Exception):
    """The document passed one of the parsing bounds: what, and the line where it did."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class _BoundedComposer(Composer):
    """PyYAML's composer (Python, over libyaml's events) counting what the document holds.

    Composing keeps an alias as a second reference to its anchor's node, so a billion laughs
    stays a few dozen nodes here and explodes only later, when the document is constructed and
    walked. So each alias counts the nodes its anchor stands for, and the count stops at its
    bound at the alias's own line. libyaml's composer, in C, cannot be watched like this; this
    one adds some 30 ms to a 2,000-node lab's 0.2 s.
    """

    _composed: int
    _repeated: int
    _depth: int
    _sizes: dict[yaml.Node, int]
    """The nodes each anchor stands for, counting the aliases inside it."""

    def _reset_counts(self) -> None:
        self._composed = self._repeated = self._depth = 0
        self._sizes = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]
        if isinstance(event, AliasEvent):
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:
                # An alias inside its own anchor counts one: the constructor refuses recursion.
                self._repeated += self._sizes.get(anchored, 1)
                if self._repeated > MAX_ALIAS_NODES:
                    raise _TooBig(
                        f"too many aliases expanded (limit {MAX_ALIAS_NODES} nodes): "
                        "a YAML alias bomb?",
                        _line(event),
                    )
            return super().compose_node(parent, index)
        self._composed += 1
        if self._composed > MAX_YAML_NODES:
            raise _TooBig(
                f"more than {MAX_YAML_NODES} YAML nodes, far more than any lab has", _line(event)
            )
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _TooBig(f"nested deeper than {MAX_YAML_DEPTH} levels", _line(event))
        before = self._composed + self._repeated
        node = super().compose_node(parent, index)
        self._depth -= 1
        if event.anchor is not None and node is not None:
            # What was composed or repeated since this node began is its subtree.
            self._sizes[node] = self._composed + self._repeated - before + 1
        return node


def _line(event: yaml.Event) -> int | None:
    return event.start_mark.line + 1 if event.start_mark is not None else None


class _TopologyLoader(_BoundedComposer, _SafeLoader):
    """YAML 1.2's core schema, as the format promises (`on`, `no` and `2024-01-01` are
    strings, `010` is ten; PyYAML's own resolvers are YAML 1.1's); every mapping and sequence
    remembers its lines; a key given twice in one mapping is an error, not a silent override;
    the document is bounded (`_BoundedComposer`).
    """

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}  # noqa: RUF012

    def __init__(self, stream: str) -> None:
        _SafeLoader.__init__(self, stream)
        Composer.__init__(self)  # CSafeLoader composes in C and leaves this out
        self._reset_counts()


for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    # int before float: the first resolver that matches wins, and "10" matches both.
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (
        "float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("merge", r"<<", "<"),  # `<<: *defaults`
):
    _TopologyLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first)
    )


def _construct_int(loader: _TopologyLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    try:
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)  # a leading zero is decimal in YAML 1.2
    except ValueError as error:  # past Python's 4,300 digits for a decimal integer
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(text)} digits", node.start_mark
        ) from error


def _key(loader: _TopologyLoader, key_node: yaml.Node) -> Any:
    key = loader.construct_object(key_node, deep=True)
    try:
        hash(key)
    except TypeError as error:
        raise yaml.constructor.ConstructorError(
            None, None, "a mapping key must be a plain value", key_node.start_mark
        ) from error
    return key


def _construct_mapping(loader: _TopologyLoader, node: yaml.MappingNode) -> _Mapping:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = _key(loader, key_node)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first_line[key]})",
                key_node.start_mark,
            )  # fmt: skip
        first_line[key] = key_node.start_mark.line + 1
    loader.flatten_mapping(node)  # merged keys first, so the mapping's own keys win
    mapping = _Mapping()
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = _key(loader, key_node)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader: _TopologyLoader, node: yaml.SequenceNode) -> _Sequence:
    sequence = _Sequence(loader.construct_object(item, deep=True) for item in node.value)
    sequence.lines = [item.start_mark.line + 1 for item in node.value]
    return sequence


_TopologyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_TopologyLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_TopologyLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


class Positions:
    """Finds the line of a field path in the parsed YAML document."""

    def __init__(self, document: Any) -> None:
        self._document = document

    def line_of(self, location: Location) -> int | None:
        node: Any = self._document
        line: int | None = 1
        for part in location:
            if isinstance(node, _Mapping):
                key = part
                if key == "[key]":  # pydantic's marker for "the dict key itself"
                    continue
                if key not in node:
                    continue
                line = node.lines[key]
                node = node[key]
            elif isinstance(node, _Sequence) and isinstance(part, int):
                if part >= len(node):
                    break
                line = node.lines[part]
                node = node[part]
            # Otherwise the model looks at the data through a different shape (the short link
            # form has no `endpoints` key): skip the part and keep the closest line found.
        return line


def load_document(text: str, source: str) -> tuple[Any, Positions]:
    """The YAML document in `text` and the lines of its fields; `source` names it in errors.

    Every YAML error, a bound passed included, is a ConfigError at the line where it was found
    (or with no line, when libyaml gives only a position).
    """
    try:
        document = yaml.load(text, Loader=_TopologyLoader)
    except _TooBig as error:
        raise ConfigError([ConfigIssue(source, error.line, "", error.message)]) from error
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue(source, line, "", f"not valid YAML: {error.problem or error.context}")]
        ) from error
    except yaml.YAMLError as error:  # a character YAML does not allow: no mark, a position
        raise ConfigError([ConfigIssue(source, None, "", f"not valid YAML: {error}")]) from error
    return document, Positions(document)
