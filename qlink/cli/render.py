"""How qlinkctl shows things to people: tables, durations, progress and event lines, the
argv as a shell command, the topology as DOT. Pure functions of what the daemon answered."""

from __future__ import annotations

import json
from collections.abc import Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def argv_lines(argv: Sequence[str]) -> str:
    """An argv as a shell command, one option and its value per line, ready to paste."""
    import shlex

    from qlink.plan.options import option_groups

    lines = [shlex.quote(argv[0])]
    lines += [" ".join(shlex.quote(item) for item in group) for group in option_groups(argv)]
    return " \\\n    ".join(lines)


def progress_line(event: dict[str, Any]) -> str | None:
    kind = event.get("event")
    if kind == "plan":
        verbs = [verb for verb in ("start", "restart", "replug", "remove") if event.get(verb)]
        lines = [f"{event['lab']}: " + (
            "; ".join(f"{verb} {', '.join(event[verb])}" for verb in verbs)
            or "nothing to change")]  # fmt: skip
        for verb in verbs:
            lines += [f"  {verb} {node}: {why}" for node, why in event[verb].items()]
        if event.get("boot_order"):
            waves = "; ".join(f"{n}. {', '.join(wave)}" for n, wave in
                              enumerate(event["boot_order"], start=1))  # fmt: skip
            lines.append(f"  boot order: {waves}")
        return "\n".join(lines)
    if kind == "boot_wait":
        return f"  {event['node']}: waits for {', '.join(event['waits_for'])} to be ready"
    if kind == "node_state":
        return f"  {event['node']}: {node_state_text(event)}"
    return None


def node_state_text(event: dict[str, Any]) -> str:
    """`running (pid 4242)`, or `failed: why` (the first line of the cause)."""
    detail = f" (pid {event['pid']})" if event.get("pid") else ""
    if event.get("last_error") and event["state"] in ("backoff", "failed"):
        detail += f": {event['last_error'].splitlines()[0]}"
    return f"{event['state']}{detail}"


def duration(seconds: float | None) -> str:
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


def print_status(nodes: list[dict[str, Any]], only_lab: str | None) -> None:
    rows = [
        [
            node["lab"], node["node"], node["state"], ready_text(node), node.get("accel") or "-",
            str(node["pid"] or "-"),
            duration(node["uptime"]), str(node["restarts"]), node["ssh"] or "-",
            " ".join(f"{iface}:{port}" for iface, port in node["ports"].items()) or "-",
        ]
        for node in nodes
        if only_lab in (None, node["lab"])
    ]  # fmt: skip
    if not rows:
        print("no labs are up")
        return
    headers = ["LAB", "NODE", "STATE", "READY", "ACCEL", "PID", "UPTIME", "RESTARTS", "SSH",
               "PORTS"]  # fmt: skip
    print(table(headers, rows))
    for node in nodes:
        if only_lab in (None, node["lab"]) and (cause := failure_cause(node)):
            print(f"{node['lab']}/{node['node']} is {node['state']}: {cause}")


def ready_text(node: dict[str, Any]) -> str:
    """`yes (12s)`: ready, that long after its QEMU started; `no`; `-` when not running."""
    if node["state"] != "running":
        return "-"
    if not node.get("ready"):
        return "no"
    after = node.get("time_to_ready")
    return f"yes ({duration(after)})" if after is not None else "yes"


def failure_cause(node: dict[str, Any]) -> str | None:
    """Why a node is down (failed or backing off), in QEMU's own words when it left any:
    the reason's first line, then what QEMU wrote to stderr, indented."""
    error = node.get("last_error")
    if node["state"] not in ("failed", "backoff") or not error:
        return None
    first, *rest = str(error).rstrip().splitlines()
    return first + "".join(f"\n    {line}" for line in rest[-5:])


def json_rows(rows: list[dict[str, Any]]) -> str:
    """A JSON array with one row per line: greppable, and fast (C encoder, no `indent`),
    which counts for `status` of a big lab."""
    return "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]" if rows else "[]"


def carrier_text(link: dict[str, Any]) -> str:
    a, b = link["a"]["carrier"], link["b"]["carrier"]
    return a if a == b else f"{link['a']['endpoint']} {a}, {link['b']['endpoint']} {b}"


def impair_text(link: dict[str, Any]) -> str:
    """`delay=20ms loss=1%` when both directions are alike, else per direction by the
    sending end (`r1:eth1> delay=20ms; r2:eth1> -`); `-` when the link is not impaired."""
    impair = link.get("impair")
    if not impair:
        return "-"

    def one(settings: dict[str, Any] | None) -> str:
        return " ".join(f"{name}={value}" for name, value in (settings or {}).items()) or "-"

    a_to_b, b_to_a = impair.get("a_to_b"), impair.get("b_to_a")
    failed = " (NOT APPLIED: see qlinkd's log)" if link.get("impair_error") else ""
    if a_to_b == b_to_a:
        return one(a_to_b) + failed
    a, b = link["a"]["endpoint"], link["b"]["endpoint"]
    return f"{a}> {one(a_to_b)}; {b}> {one(b_to_a)}{failed}"


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


def _ends(event: dict[str, Any]) -> dict[str, Any]:
    """An impair event as a `links` row, for `impair_text`."""
    return {"impair": event.get("impair"), "a": {"endpoint": event.get("a")},
            "b": {"endpoint": event.get("b")}}  # fmt: skip


def event_line(event: dict[str, Any]) -> str | None:
    """One event for people: `12:00:01.250  clos/spine1  running (pid 4242)`."""
    import time

    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    stamp += f".{int(event.get('time', 0) * 1000) % 1000:03d}"
    kind = event.get("event")
    where = f"{event.get('lab')}/{event.get('node')}" if "node" in event else event.get("lab")
    if kind == "node_state":
        text = node_state_text(event)
    elif kind == "carrier":
        where = f"{where}:{event['interface']}"
        text = f"carrier {'up' if event['up'] else event['reason']}"
    elif kind == "link_admin":
        text = f"link {event['link']} admin {event['admin']}"
    elif kind == "impair":
        text = f"link {event['link']} impair ({event['source']}): {impair_text(_ends(event))}"
    elif kind == "impair_error":
        text = f"impairment failed ({event['why']}): {event['error']}"
    elif kind == "lab":
        text = f"lab {event['action']}"
    elif kind == "console":
        text = f"console viewer {event['action']} ({event['viewers']} watching)"
    elif kind == "lagged":
        return f"{stamp}  qlinkctl events fell too far behind; qlinkd ended the stream"
    else:
        return None
    return f"{stamp}  {where}  {text}"
