"""Reading an argv back as options: `-flag value` pairs and lone `-flags`. No imports, so
qlinkctl can use it without loading the planning stack."""

from __future__ import annotations

from collections.abc import Sequence


def option_groups(argv: Sequence[str]) -> list[list[str]]:
    """The items after argv[0], grouped as each option with its value, if it takes one.

    qlink writes every option value as one item that does not start with '-', so an option
    followed by an item that does not start with '-' takes it as its value.
    """
    groups: list[list[str]] = []
    index = 1
    while index < len(argv):
        item = argv[index]
        takes_value = (
            item.startswith("-") and index + 1 < len(argv) and not argv[index + 1].startswith("-")
        )
        groups.append(list(argv[index : index + (2 if takes_value else 1)]))
        index += 2 if takes_value else 1
    return groups
