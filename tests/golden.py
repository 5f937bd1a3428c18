"""Golden plans: every file in configs/ (and tests/data/) planned in full, pinned in tests/golden/.

Regenerate with `make golden` (`python -m tests.golden`), then review the diff like code.
Paths are written with two placeholders so that the files do not depend on the checkout:
`@ROOT@` for the qlink root and `@REPO@` for the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlink.plan.argv import HostFacts
from qlink.plan.lab import plan_lab
from qlink.plan.paths import Layout
from qlink.plan.render import lab_document
from qlink.topology import load_topology

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "golden"
ROOT_MARK = "@ROOT@"
REPO_MARK = "@REPO@"
GOLDEN_HOST = HostFacts(qemu_binary="qemu-system-x86_64", kvm_usable=False)


def sources() -> list[Path]:
    return sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "tests/data").glob("*.yaml"))


def golden_path(source: Path) -> Path:
    return GOLDEN_DIR / f"{source.stem}.json"


def render(source: Path) -> str:
    lab = load_topology(source)
    plan, _ = plan_lab(lab, Layout.under(Path(ROOT_MARK)))
    text = json.dumps(lab_document(plan, GOLDEN_HOST), indent=2) + "\n"
    return text.replace(str(REPO), REPO_MARK)


def instantiate(document_text: str, root: Path) -> Any:
    """A golden document with its placeholders filled in, ready to launch."""
    return json.loads(document_text.replace(ROOT_MARK, str(root)).replace(REPO_MARK, str(REPO)))


IMPORT_DIR = REPO / "tests" / "data" / "import"
IMPORT_GOLDEN_DIR = GOLDEN_DIR / "import"


def import_sources() -> list[Path]:
    """The DOT and containerlab files `qlinkctl import` converts in the golden tests."""
    return sorted(IMPORT_DIR.glob("*.dot")) + sorted(IMPORT_DIR.glob("*.clab.yml"))


def import_golden_path(source: Path) -> Path:
    return IMPORT_GOLDEN_DIR / f"{source.name}.yaml"


def render_import(source: Path) -> str:
    """The qlink file `qlinkctl import SOURCE` writes (no --kinds)."""
    from qlink.importers import convert, detect, to_qlink  # noqa: PLC0415

    text = source.read_text()
    kind = detect(source, text)
    assert kind is not None
    relative = str(source.relative_to(REPO))
    return to_qlink(convert(text, relative, kind))[0]


def main() -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    for source in sources():
        golden_path(source).write_text(render(source))
        print(f"wrote {golden_path(source).relative_to(REPO)}")
    IMPORT_GOLDEN_DIR.mkdir(exist_ok=True)
    for source in import_sources():
        import_golden_path(source).write_text(render_import(source))
        print(f"wrote {import_golden_path(source).relative_to(REPO)}")


if __name__ == "__main__":
    main()
