"""The verbs that need no daemon: `validate`, `plan`, `host`, and `graph` of a file. Each
imports the planning stack itself, so that the daemon verbs never pay for it."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from qlink.cli.common import EXIT_OK, UsageError, client_for
from qlink.cli.render import argv_lines, graph_dot
from qlink.errors import HostError, QlinkError
from qlink.plan.paths import layout_from

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from qlink.plan.argv import HostFacts
    from qlink.topology import Lab


def file_exists(path: str) -> bool:
    return Path(path).is_file()


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


def cmd_validate(args: argparse.Namespace) -> int:
    """The file, and whether this host can run it: files there, memory, CPUs, images; and
    every node's day-0 documents rendered (their templates need the planned interfaces)."""
    from qlink.cli.interop import load_any
    from qlink.host import host_resources
    from qlink.plan.lab import plan_lab
    from qlink.state import load_allocations

    logs_to_stderr()
    lab = load_any(args.file, args.kinds, file_exists=file_exists, host=host_resources())
    layout = layout_from(args.root)
    plan_lab(lab, layout, load_allocations(layout))
    links = len(lab.links)
    print(f"{args.file}: lab {lab.name}: {len(lab.nodes)} nodes, {links} links: valid")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from qlink.cli.interop import load_any
    from qlink.plan.argv import build_argv
    from qlink.plan.lab import plan_lab
    from qlink.plan.qdisc import lab_shaping
    from qlink.plan.render import lab_document, node_document
    from qlink.state import load_allocations

    logs_to_stderr()
    lab = load_any(args.file, args.kinds)
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
    shaping = lab_shaping(plan, {link.key: link.impair for link in lab.links if link.impair})
    names = [args.node] if args.node else list(plan.nodes)
    for index, name in enumerate(names):
        if len(names) > 1:
            print(f"{'' if index == 0 else chr(10)}# {lab.name}/{name}")
        for nic in plan.nodes[name].nics:
            # The argv names each NIC's socket by descriptor only: say what qlinkd opens there.
            local = f"{nic.local_address}:{nic.local_port}"
            remote = f"{nic.remote_address}:{nic.remote_port}"
            print(
                f"# fd {nic.fd}: UDP {local} connected to {remote} ({nic.interface} to {nic.peer})"
            )
            if (shaped := shaping.get(nic.local_port)) is not None:
                # Impairment is no QEMU option: qlinkd's tc class on lo for what this sends.
                impaired = f"{shaped.netem.text()} (tc class {shaped.classid})"
                print(f"#   impaired as it sends: {impaired}")
        if plan.nodes[name].held:
            print("# -S: qlinkd runs the CPUs (QMP `cont`) once this QEMU has started")
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
        client = client_for(args)
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
