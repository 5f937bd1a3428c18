"""Boot order: which nodes a node waits for before it starts (pure).

A node waits for every node it names in `depends_on` and, when it has a `stage`, for the
nodes of the stage before it (so, in turn, for every earlier stage). It starts once all of
them are ready (their `ready:` pattern matched, or running for a node without one). A node
with neither waits for nothing. The waits must not form a cycle: `cycle` finds one for a
located error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Order:
    """What one node says about its boot order."""

    rank: int | None
    depends_on: Sequence[str]


def waits(orders: Mapping[str, Order]) -> dict[str, frozenset[str]]:
    """{node: the nodes it waits for}, for every node (known nodes only).

    A staged node waits for the nodes of the stage just before its own, which waited for
    theirs: the same order as waiting for every earlier stage, in as many edges as nodes
    rather than their square (a 2,000-node lab in stages).
    """
    by_rank: dict[int, set[str]] = {}
    for name, order in orders.items():
        if order.rank is not None:
            by_rank.setdefault(order.rank, set()).add(name)
    ranks = sorted(by_rank)
    previous = {rank: frozenset(by_rank[ranks[i - 1]]) if i else frozenset()
                for i, rank in enumerate(ranks)}  # fmt: skip
    result: dict[str, frozenset[str]] = {}
    for name, order in orders.items():
        earlier = previous[order.rank] if order.rank is not None else frozenset()
        named = {other for other in order.depends_on if other in orders}
        result[name] = earlier | named
    return result


def cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None; nodes are tried in the mapping's order."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def waves(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The nodes in start waves: each wave waits only for earlier waves (acyclic graph)."""
    remaining = {node: set(deps) for node, deps in graph.items()}
    result: list[list[str]] = []
    done: set[str] = set()
    while remaining:
        wave = sorted(node for node, deps in remaining.items() if deps <= done)
        if not wave:
            raise ValueError(f"boot order has a cycle among {sorted(remaining)}")
        result.append(wave)
        done.update(wave)
        for node in wave:
            del remaining[node]
    return result
