"""qlinkctl: the operator's command line.

It parses, calls the plan (for `validate` and `plan`) or the daemon's control API (for the
rest), and is the only place that turns errors into messages, hints and exit codes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from qlink.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    client_for,
)
from qlink.cli.interop import add_import_verb
from qlink.cli.local import cmd_graph, cmd_host, cmd_plan, cmd_validate
from qlink.cli.render import (
    carrier_text,
    event_line,
    impair_text,
    json_rows,
    print_status,
    progress_line,
    table,
)
from qlink.errors import ConfigError, ControlError, DaemonUnreachable, QlinkError
from qlink.plan.paths import layout_from

# Every command pays for this module's imports before it starts: the daemon verbs (status,
# start, stop ...) need only the client, so whatever else a verb needs is imported by that
# verb: the planning stack (pydantic, PyYAML) by `validate` and `plan`, aiohttp by
# `console`, subprocess by `graph`, shlex by `plan`. tests/test_client.py checks that the
# daemon verbs' imports stay this way. Annotations are never evaluated (`__future__`), so
# what only they name is imported for the type checker alone, `typing` included (~6 ms).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


KINDS_HELP = "for a DOT or containerlab file: kinds: {NAME: {image: ...}} to use"

# --- commands -----------------------------------------------------------------------------


def _follow(args: argparse.Namespace, events: Iterator[dict[str, Any]]) -> int:
    """Show progress on a terminal; the last event says whether everything got there."""
    dry_run = getattr(args, "dry_run", False)
    show = sys.stderr.isatty() or getattr(args, "verbose", False) or dry_run
    last: dict[str, Any] = {}
    for event in events:
        last = event
        line = progress_line(event)
        if show and line:
            # A dry run's plan is its answer (stdout); elsewhere progress is commentary.
            print(line, file=sys.stdout if dry_run else sys.stderr, flush=True)
    failed: dict[str, str] = last.get("failed", {})
    if getattr(args, "output", "text") == "json":
        print(json.dumps(last, indent=2))
    for node, reason in failed.items():
        print(f"qlinkctl: {node}: {reason}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    from qlink.sourcefile import foreign_format, read_topology_text

    path = Path(args.file).resolve()
    # The same checks as `validate` (size, encoding), located, before the daemon is asked;
    # a DOT or containerlab file is converted here (qlink/importers/), the daemon sees YAML.
    text = read_topology_text(path)
    if getattr(args, "kinds", None) or foreign_format(path, text) is not None:
        from qlink.cli.interop import topology_text

        text, _ = topology_text(str(path), args.kinds)
    query = "?dry_run=1" if args.dry_run else ""
    request = {"source": str(path), "text": text}
    if args.dry_run:
        args.verbose = True  # the plan is the whole answer of a dry run
    labs: list[str] = []

    def remembering(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for event in events:
            labs.append(event.get("lab", ""))
            yield event

    code = _follow(args, remembering(client_for(args).stream("POST", f"/labs{query}", request)))
    if code == EXIT_OK and args.wait and not args.dry_run and labs:
        nodes = [row for row in client_for(args).get("/status")["nodes"] if row["lab"] == labs[-1]]
        code = _wait_for(args, [f"{row['lab']}/{row['node']}" for row in nodes])
    if code == EXIT_OK and args.output == "text" and not args.dry_run:
        print_status(client_for(args).get("/status")["nodes"], only_lab=None)
    return code


def _wait_for(args: argparse.Namespace, nodes: list[str]) -> int:
    """Until every node in `nodes` (every node, when empty) is ready, or --timeout."""
    query = "&".join([f"timeout={args.timeout:g}", *(f"node={node}" for node in nodes)])
    not_ready: dict[str, str] = client_for(args).post(f"/wait?{query}")["not_ready"]
    for node, why in not_ready.items():
        print(f"qlinkctl: {node} is not ready: {why}", file=sys.stderr)
    return EXIT_FAILED if not_ready else EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    return _wait_for(args, args.nodes)


def cmd_down(args: argparse.Namespace) -> int:
    query = "?force=1" if args.force else ""
    return _follow(args, client_for(args).stream("DELETE", f"/labs/{args.lab}{query}"))


def cmd_node_verb(args: argparse.Namespace) -> int:
    client = client_for(args)
    suffix = "?force=1" if getattr(args, "force", False) else ""
    for node in args.nodes:
        result = client.post(f"/nodes/{node}/{args.command}{suffix}")
        pid = f" pid {result['pid']}" if result.get("pid") else ""
        print(f"{node}: {result['state']}{pid}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    nodes = client_for(args).get("/status")["nodes"]
    if args.output == "json":
        print(json_rows(nodes))
    else:
        print_status(nodes, args.lab)
    return EXIT_OK


def cmd_links(args: argparse.Namespace) -> int:
    links = client_for(args).get("/links")["links"]
    if args.output == "json":
        print(json_rows(links))
        return EXIT_OK
    rows = [
        [link["lab"], link["a"]["endpoint"], str(link["a"]["port"]), link["a"]["mac"],
         link["b"]["endpoint"], str(link["b"]["port"]), link["b"]["mac"], link["admin"],
         carrier_text(link), impair_text(link)]
        for link in links
    ]  # fmt: skip
    if not rows:
        print("no labs are up")
        return EXIT_OK
    headers = ["LAB", "A", "A PORT", "A MAC", "B", "B PORT", "B MAC", "ADMIN", "CARRIER",
               "IMPAIR"]  # fmt: skip
    print(table(headers, rows))
    return EXIT_OK


def cmd_qmp(args: argparse.Namespace) -> int:
    """One QMP command through qlinkd; KEY=VALUE gives an argument, VALUE as JSON if it is
    JSON, else as text. A refusal by qlinkd (a command for root only, or one that would take
    the VM out of qlink's hands) exits 1 with why and what to do; so does one by QEMU, whose
    error class (CommandNotFound, GenericError, ...) the message names."""
    arguments: dict[str, Any] = {}
    for item in (args.node, args.command_name, *args.arguments):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # bytes of another encoding, escaped by Python's argv
            raise UsageError(f"{item!r} is not UTF-8 text, which QMP needs") from None
    for item in args.arguments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"QMP arguments are KEY=VALUE (VALUE as JSON or text), not {item!r}")
        if key in arguments:
            raise UsageError(f"QMP argument {key!r} is given twice")
        try:
            arguments[key] = json.loads(value)
        except ValueError:  # not JSON (or a number too long for Python): the text itself
            arguments[key] = value
        except RecursionError:
            raise UsageError(f"the value of {key!r} nests too deep to be a QMP argument") from None
    reply = client_for(args).post(
        f"/nodes/{args.node}/qmp", {"execute": args.command_name, "arguments": arguments}
    )
    result = reply["return"]
    print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return EXIT_OK


def cmd_capture(args: argparse.Namespace) -> int:
    """Copy the pcap stream to a file or stdout until Ctrl-C, --seconds or --bytes."""
    query = f"?seconds={args.seconds:g}" if args.seconds else ""
    response = client_for(args).raw_stream(f"/captures/{args.endpoint}{query}")
    sink = sys.stdout.buffer if args.write == "-" else Path(args.write).open("wb")  # noqa: SIM115
    written = 0
    try:
        while chunk := response.read1(65536):
            sink.write(chunk)
            sink.flush()
            written += len(chunk)
            if args.bytes and written >= args.bytes:
                break
    except KeyboardInterrupt:
        pass
    finally:
        response.close()  # the daemon sees the hang-up and removes the filter
        if sink is not sys.stdout.buffer:
            sink.close()
    if args.write != "-":
        print(f"{args.endpoint}: {written} bytes of pcap in {args.write}", file=sys.stderr)
    return EXIT_OK


def cmd_console(args: argparse.Namespace) -> int:
    # The WebSocket client (aiohttp) takes a second to import: only this verb pays for it.
    from qlink.cli.terminal import attach_console

    return attach_console(layout_from(args.root).control_socket, args.node)


def cmd_logs(args: argparse.Namespace) -> int:
    """The node's console log and QEMU's own log; with -f, what they gain, until Ctrl-C."""
    query = [f"which={args.only or 'all'}"]
    query += ["follow=1"] if args.follow else []
    query += [f"tail={args.tail}"] if args.tail is not None else []
    response = client_for(args).raw_stream(f"/nodes/{args.node}/logs?{'&'.join(query)}")
    try:
        while chunk := response.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    except KeyboardInterrupt:
        pass
    finally:
        response.close()
    return EXIT_OK


def cmd_ssh(args: argparse.Namespace) -> int:
    """ssh to the node's management NIC: user-mode networking forwards a loopback port."""
    lab_name, _, node_name = args.node.rpartition("/")
    rows = [
        row for row in client_for(args).get("/status")["nodes"]
        if row["node"] == node_name and lab_name in ("", row["lab"])
    ]  # fmt: skip
    if len(rows) != 1:
        found = ", ".join(f"{row['lab']}/{row['node']}" for row in rows)
        raise UsageError(f"no single node {args.node!r} is up" + (f" ({found})" if found else ""))
    address = rows[0]["ssh"]
    if address is None:
        raise UsageError(f"{args.node} has no management NIC: set `mgmt: true` on it")
    host, _, port = address.rpartition(":")
    ssh = shutil.which("ssh")
    if ssh is None:
        raise UsageError("ssh is not installed (apt-get install openssh-client)")
    command = args.command or []
    if command[:1] == ["--"]:
        command = command[1:]
    # Lab VMs are rebuilt all the time: their host keys change, so none is remembered.
    argv = [ssh, "-p", port, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR"]  # fmt: skip
    # qlinkd's key, whose public half the guest got as a credential; the user's own keys and
    # agent stay usable (a network OS with a password or keys of its own).
    key = layout_from(args.root).ssh_key
    if os.access(key, os.R_OK):
        argv += ["-i", str(key)]
    argv += [f"{args.user}@{host}", *command]
    os.execv(ssh, argv)


def _inventory_hosts(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    from qlink.cli.inventory import hosts_of

    rows = client_for(args).get("/status")["nodes"]
    hosts = hosts_of(rows, args.lab)
    for row in rows:
        if not row.get("ssh") and args.lab in (None, row["lab"]):
            print(f"qlinkctl: {row['lab']}/{row['node']} has no SSH forward (mgmt: false): "
                  "left out", file=sys.stderr)  # fmt: skip
    key = layout_from(args.root).ssh_key
    return hosts, (str(key) if os.access(key, os.R_OK) else None)


def cmd_inventory(args: argparse.Namespace) -> int:
    """An Ansible inventory of the running labs: each node's SSH forward, qlinkd's key."""
    from qlink.cli import inventory

    hosts, key = _inventory_hosts(args)
    write = {"ini": inventory.inventory_ini, "yaml": inventory.inventory_yaml,
             "json": inventory.inventory_json}[args.output]  # fmt: skip
    sys.stdout.write(write(hosts, key, args.user))
    return EXIT_OK


def cmd_ssh_config(args: argparse.Namespace) -> int:
    """`ssh -F <(qlinkctl ssh-config) NODE`: every node's SSH forward as ssh_config."""
    from qlink.cli.inventory import ssh_config

    hosts, key = _inventory_hosts(args)
    sys.stdout.write(ssh_config(hosts, key, args.user))
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """What happens in the daemon, as it happens, until Ctrl-C (or --count events)."""
    query = f"?lab={args.lab}" if args.lab else ""
    seen = 0
    try:
        for event in client_for(args).stream("GET", f"/events{query}"):
            if event.get("event") == "subscribed":
                # For scripts: from this line on, nothing that happens is missed.
                if args.output == "json":
                    print(json.dumps(event), flush=True)
                continue
            line = json.dumps(event) if args.output == "json" else event_line(event)
            if line is None:
                continue
            print(line, flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    except KeyboardInterrupt:
        pass
    return EXIT_OK


IMPAIR_FLAGS = ("delay", "jitter", "distribution", "loss", "loss_correlation", "burst",
                "duplicate", "reorder", "corrupt", "rate")  # fmt: skip


def cmd_link(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in IMPAIR_FLAGS}
    settings = {name: value for name, value in given.items() if value is not None}
    if args.state != "set":
        if settings or args.clear or args.direction:
            raise UsageError("impairment flags go with `link set NODE:IF`")
        row = client_for(args).post(f"/links/{args.endpoint}/{args.state}")
        print(f"{row['link']}: admin {row['admin']}, carrier {carrier_text(row)}")
        return EXIT_OK
    if args.clear == bool(settings):
        raise UsageError("say what to impair (--delay, --loss, --rate, ...), or --clear")
    body: dict[str, Any] = {"direction": args.direction or "both", "clear": args.clear}
    if settings:
        body["settings"] = settings
    row = client_for(args).post(f"/links/{args.endpoint}/impair", body)
    print(f"{row['link']}: {impair_text(row)}")
    return EXIT_OK


# --- parsing and the error boundary -------------------------------------------------------


# argparse passes each of its messages through gettext, which searches the disk for a
# catalogue on every call: some 50 searches, 9 ms, per command. The answer cannot change within
# one process, so argparse gets a gettext that asks once per message.
argparse._ = functools.cache(argparse._)  # type: ignore[attr-defined]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlinkctl", description="Run network labs of QEMU VMs.")
    parser.add_argument(
        "--root", help="keep everything under DIR (default /var/lib/qlink and /run/qlink)"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    validate = commands.add_parser("validate", help="check a topology file")
    validate.add_argument("file")
    validate.add_argument("--kinds", metavar="FILE", help=KINDS_HELP)
    validate.set_defaults(handler=cmd_validate)

    plan = commands.add_parser("plan", help="print the exact QEMU argv; no daemon needed")
    plan.add_argument("file")
    plan.add_argument("--kinds", metavar="FILE", help=KINDS_HELP)
    plan.add_argument("node", nargs="?")
    plan.add_argument("-o", "--output", choices=("text", "json"), default="text")
    plan.set_defaults(handler=cmd_plan)

    host = commands.add_parser(
        "host", help="the QEMU binary, the kernel, and whether KVM really works here"
    )
    host.add_argument("-o", "--output", choices=("text", "json"), default="text")
    host.add_argument(
        "--refresh", action="store_true", help="probe again instead of using the cached verdict"
    )
    host.set_defaults(handler=cmd_host)

    add_import_verb(commands)
    _add_daemon_verbs(commands)
    _add_operating_verbs(commands)
    _add_console_verbs(commands)
    return parser


def _add_console_verbs(commands: Any) -> None:
    """Watching a node: its serial console and its logs."""
    console = commands.add_parser(
        "console",
        help="attach to a node's serial console; detach with Ctrl-]",
        description="Attach to NODE's serial console through qlinkd. Several viewers may "
        "attach at once: all see the output, and what each types reaches the guest. Detach "
        "with Ctrl-] (the byte 0x1d); the guest keeps running. When stdin is not a terminal, "
        "input is forwarded as it comes and its end detaches too. Exit 0 on detach, 1 when "
        "qlinkd ends the session, 2 for an unknown node, 3 when qlinkd is not running.",
    )
    console.add_argument("node", metavar="NODE", help="NODE or LAB/NODE")
    console.set_defaults(handler=cmd_console)

    logs = commands.add_parser("logs", help="a node's console log and QEMU's log (-f follows)")
    logs.add_argument("node", metavar="NODE", help="NODE or LAB/NODE")
    logs.add_argument("-f", "--follow", action="store_true", help="then print what is appended")
    logs.add_argument("--only", choices=("console", "qemu"), help="one of the two logs")
    logs.add_argument("-n", "--tail", type=int, metavar="LINES", help="start LINES from the end")
    logs.set_defaults(handler=cmd_logs)


def _add_daemon_verbs(commands: Any) -> None:
    """The verbs that talk to qlinkd."""
    up = commands.add_parser("up", help="start a lab, or bring a running one to its file")
    up.add_argument("file", help="a qlink file, or a DOT or containerlab file as it is")
    up.add_argument("--kinds", metavar="FILE", help=KINDS_HELP)
    up.add_argument("-o", "--output", choices=("text", "json"), default="text")
    up.add_argument("-v", "--verbose", action="store_true", help="progress even off a terminal")
    up.add_argument(
        "--dry-run", action="store_true", help="say what would change on a running lab, and why"
    )
    up.add_argument(
        "--wait", action="store_true", help="then wait until every node of the lab is ready"
    )
    up.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                    help="how long --wait waits (default 600)")  # fmt: skip
    up.set_defaults(handler=cmd_up)

    wait = commands.add_parser(
        "wait", help="until nodes are ready (their `ready:` line seen); exit 1 at the timeout"
    )
    wait.add_argument("nodes", nargs="*", metavar="NODE", help="NODE or LAB/NODE (default: all)")
    wait.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    wait.set_defaults(handler=cmd_wait)

    down = commands.add_parser("down", help="stop every node of a lab and forget it")
    down.add_argument("lab")
    down.add_argument("-o", "--output", choices=("text", "json"), default="text")
    down.add_argument("-v", "--verbose", action="store_true")
    down.add_argument(
        "--force", action="store_true",
        help="skip the guests' ACPI power-down: QMP quit at once, then signals",
    )  # fmt: skip
    down.set_defaults(handler=cmd_down)

    status = commands.add_parser("status", help="every node: state, pid, uptime, ports")
    status.add_argument("lab", nargs="?")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.set_defaults(handler=cmd_status)

    links = commands.add_parser("links", help="every link: both ends, ports, MACs")
    links.add_argument("-o", "--output", choices=("text", "json"), default="text")
    links.set_defaults(handler=cmd_links)

    for verb, text in (
        ("start", "start nodes (clears a failed state)"),
        ("stop", "stop nodes: ACPI power-down, then quit, then signals"),
        ("restart", "replace nodes' QEMU; peers are not touched"),
    ):
        command = commands.add_parser(verb, help=text)
        command.add_argument("nodes", nargs="+", metavar="NODE", help="NODE or LAB/NODE")
        if verb != "start":
            command.add_argument(
                "--force", action="store_true", help="skip the ACPI power-down: quit at once"
            )
        command.set_defaults(handler=cmd_node_verb)


def _add_operating_verbs(commands: Any) -> None:
    """Verbs that act on a running lab's cables and VMs, or watch them."""
    link = commands.add_parser(
        "link",
        help="cut or restore a cable (both ends lose carrier), or impair it (set)",
        description="`link down|up NODE:IF` cuts or restores the cable. `link set NODE:IF "
        "--delay 20ms --loss 1% ...` impairs it, live, with the kernel's netem: the "
        "settings given replace what the direction(s) had; `--clear` removes them. "
        "Values carry their unit: 20ms, 1%, 10mbit.",
    )
    link.add_argument("state", choices=("down", "up", "set"))
    link.add_argument("endpoint", metavar="NODE:IF", help="either end, NODE:IF or LAB/NODE:IF")
    _add_impair_flags(link)
    link.set_defaults(handler=cmd_link)

    capture = commands.add_parser(
        "capture", help="pcap of a link end, both directions, no restart (QEMU filter-dump)"
    )
    capture.add_argument("endpoint", metavar="NODE:IF")
    capture.add_argument("-w", "--write", required=True, metavar="FILE", help="a file, or -")
    capture.add_argument("--seconds", type=float, help="stop after this long")
    capture.add_argument("--bytes", type=int, help="stop after this much pcap")
    capture.set_defaults(handler=cmd_capture)

    ssh = commands.add_parser("ssh", help="ssh to a node's management NIC (needs mgmt: true)")
    ssh.add_argument("node", metavar="NODE")
    ssh.add_argument("-l", "--user", default="root")
    ssh.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    ssh.set_defaults(handler=cmd_ssh)

    inventory = commands.add_parser(
        "inventory", help="an Ansible inventory of the running labs (groups: lab, kind, stage)"
    )
    inventory.add_argument("lab", nargs="?", help="only this lab")
    inventory.add_argument("-o", "--output", choices=("ini", "yaml", "json"), default="ini")
    inventory.add_argument("-l", "--user", default="root")
    inventory.set_defaults(handler=cmd_inventory)
    ssh_config = commands.add_parser(
        "ssh-config", help="ssh_config for every node: ssh -F <(qlinkctl ssh-config) NODE"
    )
    ssh_config.add_argument("lab", nargs="?", help="only this lab")
    ssh_config.add_argument("-l", "--user", default="root")
    ssh_config.set_defaults(handler=cmd_ssh_config)

    graph = commands.add_parser("graph", help="the topology as a picture (DOT; SVG/PNG with dot)")
    graph.add_argument(
        "lab", metavar="LAB|FILE", help="a lab that is up (with link state) or a file"
    )
    graph.add_argument(
        "-o", "--output", metavar="FILE", help="FILE.dot, .svg, .png, .pdf; default stdout"
    )
    graph.set_defaults(handler=cmd_graph)

    events = commands.add_parser(
        "events", help="follow what happens: node states, carrier, cables, labs (Ctrl-C ends)"
    )
    events.add_argument("lab", nargs="?", help="only this lab's events")
    events.add_argument("-o", "--output", choices=("text", "json"), default="text")
    events.add_argument("-n", "--count", type=int, metavar="N", help="stop after N events")
    events.set_defaults(handler=cmd_events)

    qmp = commands.add_parser(
        "qmp",
        help="run a QMP command through qlinkd (most are for root only)",
        description="Run one QMP command on NODE's QEMU through qlinkd and print QEMU's answer. "
        'KEY=VALUE gives an argument: VALUE as JSON if it is JSON (42, true, {"a": 1}), '
        "else as text. QEMU runs as root and QMP can make it run programs and write host "
        "files, so anyone who may use the control socket may run only read-only and "
        "lab-operating commands: query-*, x-query-*, qom-get, qom-list, qom-list-types, "
        "qom-list-properties, device-list-properties, trace-event-get-state, set_link, "
        "system_reset, system_powerdown, system_wakeup, stop, cont, send-key, "
        "input-send-event, inject-nmi. Everything else (human-monitor-command, migrate, "
        "dump-guest-memory, screendump, device_add, netdev_add, chardev-add, object-add, "
        "blockdev-*, ...) is for root, or the user qlinkd runs as. Refused to everyone: quit "
        "(use qlinkctl stop) and removing what qlink made (its NICs, their backends, its "
        "monitor and console, a capture's filter: use qlinkctl link, up, capture). "
        "Exit 0 done, 1 refused by qlinkd or by QEMU (its error class is shown), 2 bad usage "
        "or an unknown node, 3 qlinkd is not running.",
    )
    qmp.add_argument("node", metavar="NODE")
    qmp.add_argument("command_name", metavar="COMMAND")
    qmp.add_argument("arguments", nargs="*", metavar="KEY=VALUE")
    qmp.set_defaults(handler=cmd_qmp)


def _add_impair_flags(link: argparse.ArgumentParser) -> None:
    impair = link.add_argument_group("impairment (link set)")
    impair.add_argument("--delay", metavar="TIME", help="added delay, e.g. 20ms")
    impair.add_argument("--jitter", metavar="TIME", help="the delay varies by up to this")
    impair.add_argument("--distribution", choices=("uniform", "normal", "pareto", "paretonormal"),
                        help="how the jitter is spread (default uniform)")  # fmt: skip
    impair.add_argument("--loss", metavar="PCT", help="frames lost at random, e.g. 1%%")
    impair.add_argument("--loss-correlation", metavar="PCT",
                        help="how much each loss depends on the last")  # fmt: skip
    impair.add_argument("--burst", type=float, metavar="N",
                        help="losses come in bursts of N frames, on average")  # fmt: skip
    impair.add_argument("--duplicate", metavar="PCT", help="frames sent twice")
    impair.add_argument("--reorder", metavar="PCT", help="frames sent ahead of the delayed ones")
    impair.add_argument("--corrupt", metavar="PCT", help="frames with a flipped bit")
    impair.add_argument("--rate", metavar="RATE", help="rate limit, e.g. 10mbit")
    impair.add_argument("--direction", choices=("out", "in", "both"),
                        help="frames NODE:IF sends (out), receives (in), or both")  # fmt: skip
    impair.add_argument("--clear", action="store_true", help="no impairment on the direction(s)")


def _fail(message: str, code: int, hint: str | None = None) -> int:
    print(f"qlinkctl: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except DaemonUnreachable as error:
        return _fail(str(error), EXIT_UNREACHABLE, error.hint)
    except ControlError as error:
        # 400 and 404 are the caller's mistake (bad usage); the rest is the operation failing.
        return _fail(
            str(error), EXIT_USAGE if error.status in (400, 404) else EXIT_FAILED, error.hint
        )
    except QlinkError as error:
        return _fail(str(error), EXIT_FAILED)
    except BrokenPipeError:
        # `qlinkctl plan x.yaml | head` closes the pipe early; that is not a failure.
        sys.stderr.close()
        return EXIT_OK


def main() -> NoReturn:
    # Ctrl-C must end `logs -f`, `capture`, `events` at once, even when qlinkctl was started
    # from a shell that ignores SIGINT for its background jobs (children inherit that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(run())


if __name__ == "__main__":
    main()
