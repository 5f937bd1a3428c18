"""Foreign lab files at the command line: `import`, and the DOT or containerlab file that
`up`, `validate` and `plan` take as it is (converted on the way, errors at its own lines).
Also what a running lab gives other tools: `inventory` (Ansible) and `ssh-config`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlink.cli.common import EXIT_OK

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from qlink.importers.model import Conversion
    from qlink.limits import HostResources
    from qlink.topology import Lab


def _conversion(path: str, text: str, kind: str, kinds_file: str | None) -> Conversion:
    from qlink.importers import convert
    from qlink.importers.kindmap import load_kinds_file

    kinds = load_kinds_file(kinds_file) if kinds_file else None
    return convert(text, path, kind, kinds, kinds_file)


def topology_text(path: str, kinds_file: str | None) -> tuple[str, bool]:
    """The qlink text of a file: itself, or what its DOT or containerlab text converts to
    (validated here, so that an error names the foreign file's line). True if converted."""
    from qlink.importers import detect, validate
    from qlink.sourcefile import read_topology_text

    text = read_topology_text(path)
    kind = detect(path, text)
    if kind is None:
        return text, False
    conversion = _conversion(path, text, kind, kinds_file)
    validate(conversion, path)
    from qlink.importers import to_qlink

    return to_qlink(conversion)[0], True


def load_any(
    path: str,
    kinds_file: str | None,
    file_exists: Callable[[str], bool] | None = None,
    host: HostResources | None = None,
) -> Lab:
    """A lab from a qlink, DOT or containerlab file (see `topology_text`)."""
    from qlink.topology import parse_topology_text

    text, _ = topology_text(path, kinds_file)
    return parse_topology_text(text, str(path), file_exists, host)


def cmd_import(args: argparse.Namespace) -> int:
    """Convert a DOT or containerlab file into a qlink file; report what is not mapped."""
    from qlink.importers import detect, to_qlink
    from qlink.sourcefile import read_topology_text

    text = read_topology_text(args.file)
    kind = args.format or detect(args.file, text)
    if kind is None:
        from qlink.cli.common import UsageError

        raise UsageError(
            f"{args.file}: neither topology_converter DOT nor containerlab YAML "
            "(name it .dot or .clab.yml, or say --format)"
        )
    conversion = _conversion(args.file, text, kind, args.kinds)
    output, _ = to_qlink(conversion)
    for note in conversion.reports:
        at = f"{args.file}:{note.line}" if note.line is not None else args.file
        why = f": {note.reason}" if note.reason else ""
        print(f"{at}: not converted: {note.text}{why}", file=sys.stderr)
    if args.output in (None, "-"):
        sys.stdout.write(output)
    else:
        Path(args.output).write_text(output)
    links = len(conversion.links)
    print(
        f"{args.file}: lab {conversion.name}: {len(conversion.nodes)} nodes, {links} links "
        f"converted, {len(conversion.reports)} constructs reported"
        + (f"; wrote {args.output}" if args.output not in (None, "-") else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def add_import_verb(commands: Any) -> None:
    verb = commands.add_parser(
        "import", help="convert a topology_converter DOT or containerlab file to a qlink file"
    )
    verb.add_argument("file")
    verb.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    verb.add_argument("--kinds", metavar="FILE", help="kinds: {NAME: {image: ...}} to use")
    verb.add_argument("--format", choices=("dot", "clab"), help="instead of guessing")
    verb.set_defaults(handler=cmd_import)
