"""Services never import each other; contracts import nothing of the platform. Checked on the
source, so a violation fails here before it becomes a hidden coupling."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHARED = {"runtime", "cli"}  # the shared runtime, and the composition root that wires services together
CONTRACTS_MAY_IMPORT = {"contracts", "pydantic", "aiokafka"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _service_dirs() -> list[Path]:
    return [path for path in (ROOT / "services").iterdir() if path.is_dir() and path.name not in SHARED and (path / "__init__.py").exists()]


def test_services_do_not_import_each_other() -> None:
    offences = []
    for service in _service_dirs():
        for source in service.rglob("*.py"):
            for name in _imports(source):
                parts = name.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] not in SHARED | {service.name}:
                    offences.append(f"{source.relative_to(ROOT)} imports {name}")
    assert not offences, "\n".join(offences)


def test_runtime_does_not_import_services() -> None:
    offences = [
        f"{source.relative_to(ROOT)} imports {name}"
        for source in (ROOT / "services" / "runtime").rglob("*.py")
        for name in _imports(source)
        if name.startswith("services.") and not name.startswith("services.runtime")
    ]
    assert not offences, "\n".join(offences)


def test_contracts_import_only_pydantic_and_aiokafka() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    offences = [
        f"{source.relative_to(ROOT)} imports {name}"
        for source in (ROOT / "contracts").rglob("*.py")
        for name in _imports(source)
        if name.split(".")[0] not in CONTRACTS_MAY_IMPORT | stdlib | {"__future__"}
    ]
    assert not offences, "\n".join(offences)
