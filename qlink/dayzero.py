"""A node's day-0 configuration: the NoCloud documents cloud-init reads on its first boot.

`render_seed(facts, user_data, network_config)` turns a node's `cloud_init:` (and, when given,
its network-config) into a `Seed`: `user-data`, `meta-data` and `network-config` as text.
Pure: the caller reads any file the topology names and passes its text, and says where each
document came from (`Origin`) so that every error names the topology file, its line and field.
`runtime/seed.py` writes the Seed as the `cidata` ISO the guest boots with.

Templates: Jinja2, sandboxed
    One block in `defaults` serves every node, so documents are templates. An FRR config
    needs one `neighbor swpN interface remote-as external` line per interface, which
    `string.Template` (`${node}`, no loops) cannot write; Jinja2 is the well-kept engine made
    for this (Ansible, Salt and cloud-init's `## template: jinja` use it). Its immutable
    sandbox refuses internals (`__class__`, `__globals__`, ...) and mutating what it is given:
    a template cannot run code on the host nor change the vars nodes share. Settings:
    - StrictUndefined: a misspelt name is an error naming it, never an empty string;
    - trim_blocks + lstrip_blocks: a line holding only `{% ... %}` leaves nothing behind, so a
      config-file template reads as the file it makes; keep_trailing_newline; no HTML escaping.
    A template sees `node` (the node's name), `lab`, `interfaces` (in position order, each with
    `name`, `mac`, `peer_node`, `peer_interface`, `position`) and `vars` (the file's `vars:`,
    a node's keys over the defaults' keys: `merge_vars`). `vars.NAME` is always the variable,
    even when it is called `items` or `keys`.
    Bounds, so that a slip cannot take qlinkd down: each template renders at most
    `MAX_DOCUMENT_CHARS` (checked while it streams), its `range()` calls together yield at most
    `MAX_RANGE_ITEMS` items, `*` and `**` are refused past those sizes, and no `namespace()`
    or `lipsum()` (state carried across loop turns is how a small template grows without
    bound). A template written on purpose to exhaust memory (`str.replace` chains) is not
    stopped: whoever may send qlinkd a lab is trusted as root anyway (README: who may use).

Inline mapping or text
    Text (a file's, as `#cloud-config ...`) is rendered whole, then, for `#cloud-config` and
    network-config, parsed as YAML so that a value that broke the YAML is reported here rather
    than ignored by cloud-init in the guest. A mapping written inline in the topology is NOT
    dumped to text and rendered: a value such as `it's` or `a: b`, or a var holding a newline,
    would break the YAML or add keys. Instead each string value is rendered as a template of
    its own and the result dumped by PyYAML, which quotes whatever needs it; values render to
    strings (`"{{ vars.asn }}"` gives "65001"), keys are literal, other scalars stay as written.
    The inline mapping was read as YAML 1.2 with the rest of the file while cloud-init reads
    YAML 1.1: write modes as strings (`permissions: '0644'`; 1.2 reads 0644 as 644).
    User-data starting `## template: jinja` is cloud-init's own template: passed untouched.

meta-data and the instance-id
    `local-hostname` is the node's name. cloud-init keeps the instance-id of its last boot on
    the disk and runs its per-instance modules (users, SSH host keys, write_files, runcmd, the
    network config) only when the seed's id differs; with the same id it boots as a reboot
    and ignores a changed user-data. A node's overlay is kept across restarts, so the id is
    the node's name plus a hash of lab, node, user-data and network-config: a restart with the
    same day-0 settings is a reboot of the same machine; a change re-runs day 0 on the next
    boot, whether on a fresh overlay or on the old one (where it also regenerates the SSH host
    keys, as a new instance would get). The hash covers the rendered text, so a qlink upgrade
    that dumps YAML differently also counts as a change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2 import Template as JinjaTemplate
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing

from qlink.errors import ConfigError, ConfigIssue

MAX_DOCUMENT_CHARS = 4 * 1024 * 1024  # what one template may render: the topology file's bound
MAX_RANGE_ITEMS = 100_000  # what `range()` may yield in one render, all calls (loops nest)
MAX_INT_BITS = 4096  # the largest integer `*` or `**` may make: day 0 counts lower

CLOUD_CONFIG = "#cloud-config"
CLOUD_INIT_JINJA = "## template: jinja"
# What cloud-init recognises on user-data's first line (cloudinit/handlers/__init__.py,
# INCLUSION_TYPES_MAP; `#cloud-config-archive` and `-jsonp` start with `#cloud-config`),
# and a MIME message's headers. Anything else it logs and ignores: refused here instead.
USER_DATA_STARTS = (
    "#cloud-config", "#!", "#include", "#cloud-boothook", "#part-handler", "#upstart-job",
    CLOUD_INIT_JINJA, "Content-Type:", "MIME-Version:",
)  # fmt: skip

Location = tuple[str | int, ...]
"""A path inside a document, as in the topology: `("write_files", 0, "content")`."""


@dataclass(frozen=True)
class Interface:
    """One of the node's interfaces, as a template sees it."""

    name: str
    mac: str
    peer_node: str
    peer_interface: str
    position: int  # the guest-visible place (plan/identity.py): `swp12` sits at 12


@dataclass(frozen=True)
class NodeFacts:
    """Everything a template may use about the node it is rendered for."""

    lab: str
    node: str
    interfaces: Sequence[Interface] = ()
    vars: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Origin:
    """Where a document came from, for errors: the topology field that gave it."""

    file: str  # the topology file (ConfigIssue.file)
    line: int | None  # the line of the field in it
    field: str  # the field path as the topology writes it: `nodes.leaf1.cloud_init`
    template_file: str | None = None  # the file the text was read from, if the field named one
    # For an inline mapping: the topology line of a path inside it (yamlload.Positions).
    line_of: Callable[[Location], int | None] | None = None


@dataclass(frozen=True)
class Source:
    """A document to render: text (a file's) or a mapping (inline), and where it came from."""

    content: str | Mapping[str, Any]
    origin: Origin


@dataclass(frozen=True)
class Seed:
    """The NoCloud documents of one node, as the files of its `cidata` volume hold them."""

    user_data: str
    meta_data: str
    network_config: str | None = None

    @property
    def digest(self) -> str:
        """sha256 of the three documents: equal digests, equal volumes."""
        return _digest(self.user_data, self.meta_data, self.network_config)

    def files(self) -> dict[str, str]:
        """File name -> content: the names NoCloud reads from the volume's root."""
        files = {"user-data": self.user_data, "meta-data": self.meta_data}
        if self.network_config is not None:
            files["network-config"] = self.network_config
        return files


def merge_vars(
    defaults: Mapping[str, Any] | None, node: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A node's template vars: its own keys over the defaults' keys, one level deep.

    One level, as `defaults:` merges node fields: a node that sets `bgp:` replaces the whole
    default `bgp:` mapping, so what a node gets never depends on a deep-merge rule.
    """
    return {**(defaults or {}), **(node or {})}


def render_seed(
    facts: NodeFacts, user_data: Source | None, network_config: Source | None = None
) -> Seed:
    """The node's Seed; every template error of both documents in one ConfigError.

    Without user-data the volume still needs one (NoCloud requires the file): an empty
    cloud-config.
    """
    issues: list[ConfigIssue] = []
    user_text = f"{CLOUD_CONFIG}\n"
    if user_data is not None:
        user_text = _render_document(user_data, facts, issues, user_data=True)
    network_text = None
    if network_config is not None:
        network_text = _render_document(network_config, facts, issues, user_data=False)
    if issues:
        raise ConfigError(issues)
    return Seed(user_text, meta_data(facts, user_text, network_text), network_text)


def meta_data(facts: NodeFacts, user_data: str, network_config: str | None) -> str:
    """The meta-data document: the instance-id (see the module docstring) and the hostname."""
    instance = f"{facts.node}-{_digest(facts.lab, facts.node, user_data, network_config)[:16]}"
    return yaml.safe_dump({"instance-id": instance, "local-hostname": facts.node}, sort_keys=False)


def render_text(text: str, facts: NodeFacts, origin: Origin) -> str:
    """One template rendered for the node, or a ConfigError located at `origin`."""
    try:
        return _render(text, facts)
    except _Problem as problem:
        raise ConfigError([_issue(origin, (), problem, facts)]) from problem.__cause__


# --- documents -------------------------------------------------------------------------------


def _render_document(
    source: Source, facts: NodeFacts, issues: list[ConfigIssue], *, user_data: bool
) -> str:
    origin = source.origin
    if not isinstance(source.content, str):
        tree = _render_tree(source.content, facts, origin, (), issues)
        dumped = _dump(tree)
        # The header is what makes cloud-init read user-data as cloud-config at all.
        return f"{CLOUD_CONFIG}\n{dumped}" if user_data else dumped
    text = source.content
    if user_data and text.startswith(CLOUD_INIT_JINJA):
        return text  # cloud-init's own template: its variables exist only in the guest
    try:
        rendered = _render(text, facts)
        if user_data:
            _check_user_data(rendered)
        else:
            _check_yaml_mapping(rendered)
    except _Problem as problem:
        issues.append(_issue(origin, (), problem, facts))
        return ""
    return rendered


def _render_tree(
    value: Any, facts: NodeFacts, origin: Origin, path: Location, issues: list[ConfigIssue]
) -> Any:
    """An inline mapping with each string value rendered (keys stay literal)."""
    if isinstance(value, str):
        try:
            return _render(value, facts)
        except _Problem as problem:
            issues.append(_issue(origin, path, problem, facts))
            return value
    if isinstance(value, Mapping):
        return {
            key: _render_tree(item, facts, origin, (*path, key), issues)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [
            _render_tree(item, facts, origin, (*path, index), issues)
            for index, item in enumerate(value)
        ]
    return value


def _check_user_data(text: str) -> None:
    first = text.lstrip("\ufeff").split("\n", 1)[0].rstrip("\r")
    if not first.startswith(USER_DATA_STARTS):
        raise _Problem(
            1,
            f"cloud-init would ignore this user-data: its first line must be {CLOUD_CONFIG} "
            f"(or another kind cloud-init knows: {', '.join(USER_DATA_STARTS[1:])})",
        )
    if first.strip() == CLOUD_CONFIG:
        _check_yaml_mapping(text)


def _check_yaml_mapping(text: str) -> None:
    # cloud-init reads these with PyYAML's safe loader (YAML 1.1): the same here.
    try:
        document = yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1} of the rendered text" if mark else "the rendered text"
        raise _Problem(None, f"not valid YAML at {where}: {error.problem}") from error
    except yaml.YAMLError as error:
        raise _Problem(None, f"not valid YAML once rendered: {error}") from error
    if document is not None and not isinstance(document, dict):
        kind = type(document).__name__
        raise _Problem(None, f"must be a YAML mapping once rendered, not a {kind}")


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper writing multi-line strings as `|` blocks, as a person would."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # The emitter falls back to a quoted style when a block cannot hold the value exactly,
    # but with allow_unicode it writes NEL, LS and PS raw inside quotes and blocks, where a
    # YAML reader takes them for line breaks: only the double-quoted style escapes them.
    style = '"' if not _YAML_BREAKS.isdisjoint(value) else "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_YAML_BREAKS = frozenset("\x85\u2028\u2029")
_Dumper.add_representer(str, _represent_str)


def _dump(tree: Any) -> str:
    return yaml.dump(
        tree, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
        width=1 << 16,  # long values stay on one line, as written
    )  # fmt: skip


# libyaml's loader when PyYAML was built with it (its wheels are), else the same in Python.
_YamlLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- templates -------------------------------------------------------------------------------


class _Problem(Exception):
    """A template failed: the line within it (when known) and what went wrong."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _Vars(dict[str, Any]):
    """A `vars` mapping that knows its path, for messages (`vars.bgp.asn is undefined`)."""

    __slots__ = ("path",)
    path: str


class _Undefined(StrictUndefined):
    """StrictUndefined whose message names the variable as the template wrote it."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        owner, name = self._undefined_obj, self._undefined_name
        if owner is missing:
            return f"{name!r} is undefined (a template knows: {', '.join(_CONTEXT_NAMES)})"
        if isinstance(owner, _Vars):
            known = ", ".join(sorted(map(str, owner))) or "nothing"
            return f"{owner.path}.{name} is undefined for this node ({owner.path} has: {known})"
        if isinstance(owner, Interface):
            fields = ", ".join(Interface.__dataclass_fields__)
            return f"an interface has no {name!r} (it has: {fields})"
        return super()._undefined_message


_CONTEXT_NAMES = ("node", "lab", "interfaces", "vars")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with `vars.NAME` always the variable and sizes bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, _Vars):  # a var named `items` is the var, not dict.items
            return self._var(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, _Vars):
            return self._var(obj, argument)
        return super().getitem(obj, argument)

    def _var(self, owner: _Vars, name: Any) -> Any:
        try:
            return owner[name]
        except (KeyError, TypeError):
            return self.undefined(obj=owner, name=name)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if not _bounded_binop(operator, left, right):
            raise SecurityError(f"{operator!r} would make a value too large for a template")
        return super().call_binop(context, operator, left, right)


def _bounded_binop(operator: str, left: Any, right: Any) -> bool:
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**":
        return not ints or abs(left) <= 1 or right < 0 or left.bit_length() * right <= MAX_INT_BITS
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, str | list | tuple) and isinstance(count, int):
            return len(sequence) * count <= MAX_DOCUMENT_CHARS
    return not ints or left.bit_length() + right.bit_length() <= MAX_INT_BITS


def _sandbox() -> _Sandbox:
    # Not HTML: no autoescape (Environment's default).
    environment = _Sandbox(
        undefined=_Undefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    for name in ("namespace", "lipsum"):
        del environment.globals[name]
    return environment


_SANDBOX = _sandbox()
_TEMPLATE_NAME = "<template>"  # the file name Jinja gives a template's frames in tracebacks


@lru_cache(maxsize=256)
def _compile_cached(text: str) -> JinjaTemplate:
    return _SANDBOX.from_string(text)


def _compile(text: str) -> JinjaTemplate:
    # Labs share one block among many nodes: compile it once (compiling costs ~1 ms),
    # but keep no huge text alive in the cache.
    return _compile_cached(text) if len(text) <= 65536 else _SANDBOX.from_string(text)


def _render(text: str, facts: NodeFacts) -> str:
    if "{" not in text:
        return text  # no template syntax: most inline values
    try:
        template = _compile(text)
    except TemplateSyntaxError as error:
        raise _Problem(error.lineno, f"template syntax: {error.message}") from error
    context = {
        "node": facts.node,
        "lab": facts.lab,
        "interfaces": tuple(sorted(facts.interfaces, key=lambda interface: interface.position)),
        "vars": _wrap_vars(facts.vars, "vars"),
        "range": _budgeted_range(),
    }
    try:
        return _joined(template.generate(context))
    except Exception as error:  # a template can raise anything Python can: say where
        raise _Problem(_template_line(error), _describe(error)) from error


def _joined(chunks: Iterator[str]) -> str:
    parts: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_DOCUMENT_CHARS:
            raise SecurityError(f"the rendered text passed {MAX_DOCUMENT_CHARS} characters")
        parts.append(chunk)
    return "".join(parts)


def _budgeted_range() -> Callable[..., range]:
    left = MAX_RANGE_ITEMS

    def budgeted(*args: int) -> range:
        nonlocal left
        numbers = range(*args)
        left -= len(numbers)
        if left < 0:
            raise SecurityError(f"range() gave more than {MAX_RANGE_ITEMS} items in one render")
        return numbers

    return budgeted


def _wrap_vars(value: Any, path: str) -> Any:
    if isinstance(value, Mapping):
        wrapped = _Vars({key: _wrap_vars(item, f"{path}.{key}") for key, item in value.items()})
        wrapped.path = path
        return wrapped
    if isinstance(value, list | tuple):
        return tuple(_wrap_vars(item, f"{path}[{index}]") for index, item in enumerate(value))
    return value


def _template_line(error: BaseException) -> int | None:
    # Jinja rewrites the traceback so that a template's frames carry its own line numbers.
    line = None
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == _TEMPLATE_NAME:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


def _describe(error: Exception) -> str:
    if isinstance(error, SecurityError):
        return f"not allowed in a template: {error}"
    return str(error) if isinstance(error, TemplateError) else f"{type(error).__name__}: {error}"


# --- errors and digests ----------------------------------------------------------------------


def _issue(origin: Origin, path: Location, problem: _Problem, facts: NodeFacts) -> ConfigIssue:
    line = (origin.line_of(path) if path and origin.line_of else None) or origin.line
    if problem.line is not None:
        within = f"line {problem.line} of {origin.template_file or 'the template'}: "
    else:
        within = f"{origin.template_file}: " if origin.template_file else ""
    # A block in `defaults` is rendered once per node, and may fail for only some of them.
    message = f"{within}{problem.message} (for node {facts.node})"
    return ConfigIssue(origin.file, line, origin.field + _path_text(path), message)


def _path_text(path: Location) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def _digest(*parts: str | None) -> str:
    # Each part framed by its length (None by its own mark), so no two tuples hash alike.
    digest = hashlib.sha256()
    for part in parts:
        data = b"" if part is None else part.encode()
        digest.update(b"-" if part is None else b"+%d:%b" % (len(data), data))
    return digest.hexdigest()
