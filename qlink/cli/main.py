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
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from qlink.cli.client import Client
from qlink.errors import ConfigError, ControlError, DaemonUnreachable, HostError, QlinkError
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

    from qlink.plan.argv import HostFacts
    from qlink.topology import Lab

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class UsageError(QlinkError):
    """The command line itself is wrong (exit 2)."""


def file_exists(path: str) -> bool:
    return Path(path).is_file()


def argv_lines(argv: Sequence[str]) -> str:
    """An argv as a shell command, one option and its value per line, ready to paste."""
    import shlex

    from qlink.plan.options import option_groups

    lines = [shlex.quote(argv[0])]
    lines += [" ".join(shlex.quote(item) for item in group) for group in option_groups(argv)]
    return " \\\n    ".join(lines)


def logs_to_stderr() -> None:
    """Whatever the planning stack logs (a host probe, say) goes to stderr: stdout is the
    command's answer, JSON for `-o json`. Only verbs that import that stack call this."""
    from qlink import logs

    logs.configure(json=False, stream=sys.stderr)


def host_facts_for(lab: Lab) -> HostFacts:
    """Probe the host only when a node leaves the accelerator to qlink."""
    from qlink.host import describe_host_without_qemu, find_qemu, probe_host
    from qlink.plan.argv import HostFacts

    if all(node.accel != "auto" for node in lab.nodes.values()):
        try:
            return HostFacts(qemu_binary=find_qemu())
        except HostError:
            return describe_host_without_qemu()
    try:
        return probe_host()
    except HostError as error:
        print(f"note: {error}; planning `accel: auto` as tcg", file=sys.stderr)
        return describe_host_without_qemu()


# --- commands -----------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from qlink.topology import load_topology

    logs_to_stderr()
    lab = load_topology(args.file, file_exists=file_exists)
    links = len(lab.links)
    print(f"{args.file}: lab {lab.name}: {len(lab.nodes)} nodes, {links} links: valid")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from qlink.plan.argv import build_argv
    from qlink.plan.lab import plan_lab
    from qlink.plan.render import lab_document, node_document
    from qlink.state import load_allocations
    from qlink.topology import load_topology

    logs_to_stderr()
    lab = load_topology(args.file)
    layout = layout_from(args.root)
    plan, _ = plan_lab(lab, layout, load_allocations(layout))
    host = host_facts_for(lab)
    if args.node is not None and args.node not in plan.nodes:
        raise UsageError(f"no node {args.node!r} in {args.file} (nodes: {', '.join(plan.nodes)})")
    if args.output == "json":
        document: Any = (
            node_document(plan.nodes[args.node], host) if args.node else lab_document(plan, host)
        )
        print(json.dumps(document, indent=2))
        return EXIT_OK
    names = [args.node] if args.node else list(plan.nodes)
    for index, name in enumerate(names):
        if len(names) > 1:
            print(f"{'' if index == 0 else chr(10)}# {lab.name}/{name}")
        print(argv_lines(build_argv(plan.nodes[name], host)))
    return EXIT_OK


def cmd_host(args: argparse.Namespace) -> int:
    """What qlink knows of this host, and why `accel: auto` means KVM or TCG here."""
    from qlink.host import host_report

    logs_to_stderr()
    report = host_report(refresh=args.refresh)
    if args.output == "json":
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    facts = report.as_dict()
    probed = "cached, probed" if report.cached else "probed just now,"
    rows = [
        ("qemu", f"{facts['qemu']} ({facts['qemu_version']})"),
        ("kernel", f"{facts['kernel']} (boot {facts['boot_id']})"),
        ("kvm", "usable" if report.kvm_usable else "not usable"),
        ("why", report.kvm_reason),
        ("accel: auto", f"{facts['accel_auto']}"),
        ("probe", f"{probed} in {facts['probe_seconds']} s "
                  f"(-machine {facts['probe_machine']} -cpu {facts['probe_cpu']})"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return EXIT_OK


def _client(args: argparse.Namespace) -> Client:
    return Client(layout_from(args.root).control_socket)


def _progress_line(event: dict[str, Any]) -> str | None:
    kind = event.get("event")
    if kind == "plan":
        verbs = [verb for verb in ("start", "restart", "replug", "remove") if event.get(verb)]
        lines = [f"{event['lab']}: " + (
            "; ".join(f"{verb} {', '.join(event[verb])}" for verb in verbs)
            or "nothing to change")]  # fmt: skip
        for verb in verbs:
            lines += [f"  {verb} {node}: {why}" for node, why in event[verb].items()]
        return "\n".join(lines)
    if kind == "node_state":
        detail = f" (pid {event['pid']})" if event.get("pid") else ""
        if event.get("last_error") and event["state"] in ("backoff", "failed"):
            detail += f": {event['last_error'].splitlines()[0]}"
        return f"  {event['node']}: {event['state']}{detail}"
    return None


def _follow(args: argparse.Namespace, events: Iterator[dict[str, Any]]) -> int:
    """Show progress on a terminal; the last event says whether everything got there."""
    dry_run = getattr(args, "dry_run", False)
    show = sys.stderr.isatty() or getattr(args, "verbose", False) or dry_run
    last: dict[str, Any] = {}
    for event in events:
        last = event
        line = _progress_line(event)
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
    path = Path(args.file).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {args.file}: {error.strerror}") from error
    query = "?dry_run=1" if args.dry_run else ""
    request = {"source": str(path), "text": text}
    if args.dry_run:
        args.verbose = True  # the plan is the whole answer of a dry run
    code = _follow(args, _client(args).stream("POST", f"/labs{query}", request))
    if code == EXIT_OK and args.output == "text" and not args.dry_run:
        _print_status(_client(args).get("/status")["nodes"], only_lab=None)
    return code


def cmd_down(args: argparse.Namespace) -> int:
    return _follow(args, _client(args).stream("DELETE", f"/labs/{args.lab}"))


def cmd_node_verb(args: argparse.Namespace) -> int:
    client = _client(args)
    suffix = "?force=1" if getattr(args, "force", False) else ""
    for node in args.nodes:
        result = client.post(f"/nodes/{node}/{args.command}{suffix}")
        pid = f" pid {result['pid']}" if result.get("pid") else ""
        print(f"{node}: {result['state']}{pid}")
    return EXIT_OK


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in (headers, *rows)]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


def _print_status(nodes: list[dict[str, Any]], only_lab: str | None) -> None:
    rows = [
        [
            node["lab"], node["node"], node["state"], node.get("accel") or "-",
            str(node["pid"] or "-"),
            _duration(node["uptime"]), str(node["restarts"]), node["ssh"] or "-",
            " ".join(f"{iface}:{port}" for iface, port in node["ports"].items()) or "-",
        ]
        for node in nodes
        if only_lab in (None, node["lab"])
    ]  # fmt: skip
    if not rows:
        print("no labs are up")
        return
    headers = ["LAB", "NODE", "STATE", "ACCEL", "PID", "UPTIME", "RESTARTS", "SSH", "PORTS"]
    print(table(headers, rows))


def json_rows(rows: list[dict[str, Any]]) -> str:
    """A JSON array with one row per line: greppable, and fast (C encoder, no `indent`),
    which counts for `status` of a big lab."""
    return "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]" if rows else "[]"


def cmd_status(args: argparse.Namespace) -> int:
    nodes = _client(args).get("/status")["nodes"]
    if args.output == "json":
        print(json_rows(nodes))
    else:
        _print_status(nodes, args.lab)
    return EXIT_OK


def cmd_links(args: argparse.Namespace) -> int:
    links = _client(args).get("/links")["links"]
    if args.output == "json":
        print(json_rows(links))
        return EXIT_OK
    rows = [
        [link["lab"], link["a"]["endpoint"], str(link["a"]["port"]), link["a"]["mac"],
         link["b"]["endpoint"], str(link["b"]["port"]), link["b"]["mac"], link["admin"],
         _carrier_text(link)]
        for link in links
    ]  # fmt: skip
    if not rows:
        print("no labs are up")
        return EXIT_OK
    headers = ["LAB", "A", "A PORT", "A MAC", "B", "B PORT", "B MAC", "ADMIN", "CARRIER"]
    print(table(headers, rows))
    return EXIT_OK


def _carrier_text(link: dict[str, Any]) -> str:
    a, b = link["a"]["carrier"], link["b"]["carrier"]
    return a if a == b else f"{link['a']['endpoint']} {a}, {link['b']['endpoint']} {b}"


def cmd_qmp(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {}
    for item in args.arguments:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"QMP arguments are KEY=VALUE (VALUE as JSON or text), not {item!r}")
        try:
            arguments[key] = json.loads(value)
        except json.JSONDecodeError:
            arguments[key] = value
    reply = _client(args).post(
        f"/nodes/{args.node}/qmp", {"execute": args.command_name, "arguments": arguments}
    )
    result = reply["return"]
    print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return EXIT_OK


def cmd_capture(args: argparse.Namespace) -> int:
    """Copy the pcap stream to a file or stdout until Ctrl-C, --seconds or --bytes."""
    query = f"?seconds={args.seconds:g}" if args.seconds else ""
    response = _client(args).raw_stream(f"/captures/{args.endpoint}{query}")
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
    response = _client(args).raw_stream(f"/nodes/{args.node}/logs?{'&'.join(query)}")
    try:
        while chunk := response.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    except KeyboardInterrupt:
        pass
    finally:
        response.close()
    return EXIT_OK


def graph_dot(lab: str, links: list[dict[str, Any]], nodes: dict[str, str]) -> str:
    """The lab as Graphviz DOT: a box per node, an edge per cable labelled with its ports;
    a cable that is cut is red and dashed, one whose carrier is down is grey and dotted."""

    def quoted(text: str) -> str:
        # Names are allow-listed (no quotes, no backslashes); a label's \n is DOT's newline.
        return f'"{text}"'

    lines = [
        f"graph {quoted(lab)} {{",
        "  graph [overlap=false, splines=true];",
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname=Helvetica];',
        "  edge [fontname=Helvetica, fontsize=9];",
    ]
    for name, state in nodes.items():
        fill = "" if state in ("running", "") else ', fillcolor="#f6dada"'
        label = name if state in ("running", "") else f"{name}\\n({state})"
        lines.append(f"  {quoted(name)} [label={quoted(label)}{fill}];")
    for link in links:
        a_node, a_if = link["a"]["endpoint"].split(":")
        b_node, b_if = link["b"]["endpoint"].split(":")
        style = ""
        if link.get("admin") == "down":
            style = ', color="#c0392b", style=dashed'
        elif any(end.get("carrier", "up") != "up" for end in (link["a"], link["b"])):
            style = ', color="#999999", style=dotted'
        lines.append(
            f"  {quoted(a_node)} -- {quoted(b_node)} "
            f"[taillabel={quoted(a_if)}, headlabel={quoted(b_if)}{style}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def cmd_graph(args: argparse.Namespace) -> int:
    """DOT always; SVG/PNG/PDF through graphviz's `dot` when it is installed."""
    import subprocess

    source = Path(args.lab)
    if source.suffix in (".yaml", ".yml") or source.is_file():
        from qlink.topology import load_topology

        logs_to_stderr()
        lab = load_topology(source)
        name = lab.name
        links = [{"a": {"endpoint": str(link.endpoints[0])},
                  "b": {"endpoint": str(link.endpoints[1])}} for link in lab.links]  # fmt: skip
        nodes = dict.fromkeys(lab.nodes, "")
    else:
        client = _client(args)
        name = args.lab
        links = [row for row in client.get("/links")["links"] if row["lab"] == name]
        nodes = {row["node"]: row["state"] for row in client.get("/status")["nodes"]
                 if row["lab"] == name}  # fmt: skip
        if not nodes:
            raise UsageError(f"no lab {name!r} is up (give a topology file to draw it anyway)")
    dot = graph_dot(name, links, nodes)
    if args.output in (None, "-") or args.output.endswith(".dot"):
        if args.output in (None, "-"):
            print(dot, end="")
        else:
            Path(args.output).write_text(dot)
        return EXIT_OK
    image_format = Path(args.output).suffix.lstrip(".")
    dot_binary = shutil.which("dot")
    if dot_binary is None:
        raise UsageError(
            f"drawing {image_format.upper()} needs graphviz (apt-get install graphviz); "
            "without it, write DOT: -o FILE.dot"
        )
    result = subprocess.run(
        [dot_binary, f"-T{image_format}", "-o", args.output],
        input=dot, text=True, capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        raise QlinkError(f"dot failed: {result.stderr.strip()}")
    print(f"{args.output}: {len(nodes)} nodes, {len(links)} links", file=sys.stderr)
    return EXIT_OK


def cmd_ssh(args: argparse.Namespace) -> int:
    """ssh to the node's management NIC: user-mode networking forwards a loopback port."""
    lab_name, _, node_name = args.node.rpartition("/")
    rows = [
        row for row in _client(args).get("/status")["nodes"]
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


def cmd_link(args: argparse.Namespace) -> int:
    row = _client(args).post(f"/links/{args.endpoint}/{args.state}")
    print(f"{row['link']}: admin {row['admin']}, carrier {_carrier_text(row)}")
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
    validate.set_defaults(handler=cmd_validate)

    plan = commands.add_parser("plan", help="print the exact QEMU argv; no daemon needed")
    plan.add_argument("file")
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

    _add_daemon_verbs(commands)
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
    up.add_argument("file")
    up.add_argument("-o", "--output", choices=("text", "json"), default="text")
    up.add_argument("-v", "--verbose", action="store_true", help="progress even off a terminal")
    up.add_argument(
        "--dry-run", action="store_true", help="say what would change on a running lab, and why"
    )
    up.set_defaults(handler=cmd_up)

    down = commands.add_parser("down", help="stop every node of a lab and forget it")
    down.add_argument("lab")
    down.add_argument("-o", "--output", choices=("text", "json"), default="text")
    down.add_argument("-v", "--verbose", action="store_true")
    down.set_defaults(handler=cmd_down)

    status = commands.add_parser("status", help="every node: state, pid, uptime, ports")
    status.add_argument("lab", nargs="?")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.set_defaults(handler=cmd_status)

    links = commands.add_parser("links", help="every link: both ends, ports, MACs")
    links.add_argument("-o", "--output", choices=("text", "json"), default="text")
    links.set_defaults(handler=cmd_links)

    link = commands.add_parser("link", help="cut or restore a cable: both ends lose carrier")
    link.add_argument("state", choices=("down", "up"))
    link.add_argument("endpoint", metavar="NODE:IF", help="either end, NODE:IF or LAB/NODE:IF")
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

    graph = commands.add_parser("graph", help="the topology as a picture (DOT; SVG/PNG with dot)")
    graph.add_argument(
        "lab", metavar="LAB|FILE", help="a lab that is up (with link state) or a file"
    )
    graph.add_argument(
        "-o", "--output", metavar="FILE", help="FILE.dot, .svg, .png, .pdf; default stdout"
    )
    graph.set_defaults(handler=cmd_graph)

    qmp = commands.add_parser("qmp", help="run a QMP command through qlinkd")
    qmp.add_argument("node", metavar="NODE")
    qmp.add_argument("command_name", metavar="COMMAND")
    qmp.add_argument("arguments", nargs="*", metavar="KEY=VALUE")
    qmp.set_defaults(handler=cmd_qmp)

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
    raise SystemExit(run())


if __name__ == "__main__":
    main()
