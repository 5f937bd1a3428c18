"""Where things are in a DOT file: the line of each top-level node statement, edge and
attribute. pydot parses (`dot.py`); this only finds lines for reports and errors, which the
parsed graph does not keep.

The scan follows DOT's lexical rules (quoted strings with escapes, HTML strings, `//`, `#`
and `/* */` comments) so that a `--` inside a string or a comment is not taken for an edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_PUNCT = set("{}[]=,;:")
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    """An ID unquoted; punctuation and edge operators as written."""
    line: int
    depth: int
    """Braces open around it: 1 is the graph's own statements."""
    quoted: bool = False


@dataclass
class Statement:
    line: int
    attributes: dict[str, int] = field(default_factory=dict)
    """{attribute: its line}"""


@dataclass
class Locations:
    nodes: dict[str, Statement] = field(default_factory=dict)
    """The first top-level statement declaring each node (its attribute list's lines)."""
    edges: list[Statement] = field(default_factory=list)
    """One per top-level edge operator, in file order (as pydot numbers edges)."""
    defaults: list[tuple[str, Statement]] = field(default_factory=list)
    """`node [...]`, `edge [...]`, `graph [...]` and `key=value` at the top level."""
    subgraphs: list[int] = field(default_factory=list)


def _skip_comment(text: str, index: int) -> int:
    if text.startswith("/*", index):
        end = text.find("*/", index + 2)
        return len(text) if end < 0 else end + 2
    end = text.find("\n", index)
    return len(text) if end < 0 else end


def _quoted(text: str, index: int) -> tuple[str, int]:
    """The string starting at the quote at `index`, unescaped (\\" only), and its end."""
    out: list[str] = []
    index += 1
    while index < len(text) and text[index] != '"':
        if text[index] == "\\" and index + 1 < len(text):
            index += 1
        out.append(text[index])
        index += 1
    return "".join(out), index + 1


def _html(text: str, index: int) -> int:
    depth = 0
    while index < len(text):
        depth += {"<": 1, ">": -1}.get(text[index], 0)
        index += 1
        if depth == 0:
            break
    return index


def tokens(text: str) -> list[Token]:
    result: list[Token] = []
    index, depth = 0, 0
    while index < len(text):
        char = text[index]
        line = text.count("\n", 0, index) + 1
        if char.isspace():
            index += 1
        elif text.startswith(("//", "/*"), index) or char == "#":
            index = _skip_comment(text, index)
        elif text.startswith(("--", "->"), index):
            result.append(Token(text[index : index + 2], line, depth))
            index += 2
        elif char == '"':
            value, index = _quoted(text, index)
            result.append(Token(value, line, depth, quoted=True))
        elif char == "<":
            end = _html(text, index)
            result.append(Token(text[index:end], line, depth, quoted=True))
            index = end
        elif char in _PUNCT:
            depth += {"{": 1, "}": -1}.get(char, 0)
            result.append(Token(char, line, depth if char != "{" else depth - 1))
            index += 1
        else:
            end = index
            while end < len(text) and text[end] in _ID_CHARS and not text.startswith("--", end):
                end += 1
            end = max(end, index + 1)
            result.append(Token(text[index:end], line, depth))
            index = end
    return result


def _attributes(toks: list[Token], start: int) -> tuple[dict[str, int], int]:
    """The attribute list(s) at `start` (a `[`): {key: line}, and the index after them."""
    found: dict[str, int] = {}
    index = start
    while index < len(toks) and toks[index].text == "[" and not toks[index].quoted:
        index += 1
        while index < len(toks) and not (toks[index].text == "]" and not toks[index].quoted):
            if index + 1 < len(toks) and toks[index + 1].text == "=":
                found.setdefault(toks[index].text, toks[index].line)
            index += 1
        index += 1
    return found, index


def _is(token: Token, *texts: str) -> bool:
    return not token.quoted and token.text in texts


def locate(text: str) -> Locations:
    toks = tokens(text)
    where = Locations()
    in_brackets = False
    for index, token in enumerate(toks):
        if _is(token, "[", "]"):
            in_brackets = token.text == "["
            continue
        if token.depth != 1 or in_brackets:
            continue
        before = toks[index - 1] if index else None
        after = toks[index + 1] if index + 1 < len(toks) else None
        if _is(token, "--", "->"):
            where.edges.append(_edge(toks, index))
        elif _is(token, "{"):
            where.subgraphs.append(token.line)
        elif after is not None and _is(after, "="):
            where.defaults.append((token.text, Statement(token.line, {token.text: token.line})))
        elif (
            after is not None and _is(after, "[") and not (before and _is(before, ":", "--", "->"))
        ):
            attributes, _ = _attributes(toks, index + 1)
            statement = Statement(token.line, attributes)
            if not token.quoted and token.text in ("node", "edge", "graph"):
                where.defaults.append((token.text, statement))
            else:
                where.nodes.setdefault(token.text, statement)
    return where


def _edge(toks: list[Token], index: int) -> Statement:
    statement = Statement(toks[index].line)
    # The edge's attributes follow its last endpoint: skip `ID (: ID)*`.
    probe = index + 1
    while probe < len(toks) and not _is(toks[probe], "[", "--", "->", ";", "{", "}"):
        probe += 1
    if probe < len(toks) and _is(toks[probe], "["):
        statement.attributes = _attributes(toks, probe)[0]
    return statement


def first_mention(text: str, name: str) -> int | None:
    """The line of the first top-level token that is `name` (a node only named in edges)."""
    for token in tokens(text):
        if token.depth == 1 and token.text == name:
            return token.line
    return None
