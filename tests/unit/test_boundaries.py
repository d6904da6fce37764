"""The import graph's boundaries, checked on the source so a violation fails here before it becomes a
hidden coupling: no import circle; services never import each other; the runtime imports no service; the
CLI and the demo (services/demo, a composition above the services like the CLI) reach a service only
through its `app` or `cli` module, found by name, and only the CLI imports the demo; contracts import
nothing of the platform.

The graph is grimp's over `contracts`, `services` and `infra`: every import statement, those inside
functions and under TYPE_CHECKING included (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contracts", "services", "infra")
# The shared runtime, the CLI that mounts the services' commands, and the demo that runs them all: not services.
SHARED = {"runtime", "cli", "demo"}
# The compositions above the services, which build them only through their factories and commands.
COMPOSITIONS = ("services.cli", "services.demo")
CLI_MAY_IMPORT_OF_A_SERVICE = {"app", "cli"}
CONTRACTS_MAY_IMPORT = {"contracts", "pydantic", "aiokafka"}
IMPORTLIB_CALLS = {"import_module", "find_spec", "__import__"}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _service_of(module: str) -> str | None:
    """`registry` for services.registry.*; None for the runtime, the CLI and anything outside services."""
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 and parts[1] not in SHARED else None


def _where(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    lines = ", ".join(
        f"{detail['line_number']}" for detail in graph.get_import_details(importer=importer, imported=imported)
    )
    return f"{importer} imports {imported}" + (f" (line {lines})" if lines else "")


# ------------------------------------------------------------------------------------------ cycles


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One circle per strongly connected component of the graph, as a path that ends where it starts.

    Tarjan's algorithm, iterative: a recursive one would follow a long import chain past Python's stack."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        while work:
            module, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.find_modules_directly_imported_by(successor)))))
                    break
                if successor in on_stack:
                    low[module] = min(low[module], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == module:
                            break
                    if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                        components.append(component)
    return [_circle(graph, component) for component in components]


def _circle(graph: grimp.ImportGraph, component: set[str]) -> list[str]:
    start = min(component)
    for successor in sorted(graph.find_modules_directly_imported_by(start) & component):
        if successor == start:
            return [start, start]
        chain = graph.find_shortest_chain(importer=successor, imported=start)
        if chain:
            return [start, *chain]
    raise AssertionError(f"no circle through {start} in the component {sorted(component)}")


def test_the_import_graph_has_no_circle(graph: grimp.ImportGraph) -> None:
    circles = import_cycles(graph)
    assert not circles, "import circles (break each at one edge):\n" + "\n".join(
        " -> ".join(circle) + "\n    " + "\n    ".join(_where(graph, a, b) for a, b in itertools.pairwise(circle))
        for circle in circles
    )


def test_the_circle_finder_finds_a_circle_and_names_it() -> None:
    made = grimp.ImportGraph()
    for importer, imported in [
        ("pkg.store", "pkg.embedded"),
        ("pkg.embedded", "pkg.store"),
        ("pkg.factory", "pkg.store"),
        ("pkg.a", "pkg.b"),
        ("pkg.b", "pkg.c"),
        ("pkg.c", "pkg.a"),
    ]:
        made.add_import(importer=importer, imported=imported)
    assert sorted(import_cycles(made)) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.embedded", "pkg.store", "pkg.embedded"],
    ]
    made.remove_import(importer="pkg.c", imported="pkg.a")
    assert import_cycles(made) == [["pkg.embedded", "pkg.store", "pkg.embedded"]]


# ------------------------------------------------------------------------------------------ services


def test_services_do_not_import_each_other(graph: grimp.ImportGraph) -> None:
    offences = [
        _where(graph, module, imported)
        for module in sorted(graph.modules)
        if (service := _service_of(module)) is not None
        for imported in sorted(graph.find_modules_directly_imported_by(module))
        # A service imports contracts, the shared runtime and itself: not another service, nor the CLI above it.
        if imported.split(".")[0] == "services"
        and imported != "services"
        and imported.split(".")[1] not in {"runtime", service}
    ]
    assert not offences, "\n".join(offences)


def test_runtime_does_not_import_services(graph: grimp.ImportGraph) -> None:
    offences = [
        _where(graph, module, imported)
        for module in sorted(graph.find_descendants("services.runtime"))
        for imported in sorted(graph.find_modules_directly_imported_by(module))
        if imported.startswith("services.") and not imported.startswith("services.runtime")
    ]
    assert not offences, "\n".join(offences)


# ------------------------------------------------------------------------------------------ the CLI


def _cli_may_import(module: str) -> bool:
    """Of a service, the CLI imports its `app` (run_cmd.py) or `cli` (its commands), and nothing else; the
    package itself is asked for only to tell whether the service is part of the installation."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) == 1 or parts[1] in SHARED:
        return True
    return len(parts) == 2 or (len(parts) == 3 and parts[2] in CLI_MAY_IMPORT_OF_A_SERVICE)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_the_cli_and_the_demo_import_of_a_service_only_its_app_and_cli(
    graph: grimp.ImportGraph, composition: str
) -> None:
    modules = graph.find_descendants(composition)
    assert modules, f"{composition} has no modules: the check would pass for nothing"
    offences = [
        _where(graph, module, imported)
        for module in sorted(modules)
        for imported in sorted(graph.find_modules_directly_imported_by(module))
        if not _cli_may_import(imported)
    ]
    assert not offences, "\n".join(offences)


def test_only_the_cli_imports_the_demo(graph: grimp.ImportGraph) -> None:
    """The demo is a user of the platform: no service, no runtime module and no other command depends on it."""
    offences = [
        _where(graph, importer, module)
        for module in sorted(graph.find_descendants("services.demo") | {"services.demo"})
        for importer in sorted(graph.find_modules_that_directly_import(module))
        if not importer.startswith("services.demo") and importer != "services.cli.main"
    ]
    assert not offences, "\n".join(offences)


def importlib_names(source: str) -> Iterator[tuple[int, str | None]]:
    """The module names `source` hands to importlib (import_module, find_spec, __import__), with `*` for each
    formatted part of an f-string; None for a name computed otherwise, which cannot be checked."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        function = (
            node.func.attr
            if isinstance(node.func, ast.Attribute)
            else node.func.id
            if isinstance(node.func, ast.Name)
            else None
        )
        if function not in IMPORTLIB_CALLS:
            continue
        name = node.args[0]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            yield node.lineno, name.value
        elif isinstance(name, ast.JoinedStr):
            yield node.lineno, "".join(part.value if isinstance(part, ast.Constant) else "*" for part in name.values)
        else:
            yield node.lineno, None


def importlib_offences(source: str) -> list[str]:
    offences = []
    for line, name in importlib_names(source):
        if name is None:
            offences.append(f"line {line}: a module name importlib gets that is neither a literal nor an f-string")
        elif not _cli_may_import(name):
            offences.append(f"line {line}: {name}")
    return offences


def test_the_cli_and_the_demo_name_to_importlib_only_a_service_app_or_cli() -> None:
    offences = [
        f"{source.relative_to(ROOT)} {offence}"
        for composition in COMPOSITIONS
        for source in sorted((ROOT / composition.replace(".", "/")).rglob("*.py"))
        for offence in importlib_offences(source.read_text())
    ]
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize(
    ("source", "refused"),
    [
        ('importlib.import_module(f"services.{name}.cli")', False),
        ('importlib.util.find_spec(f"services.{name}")', False),
        ('import_module("services.registry.app")', False),
        ('import_module("services.runtime.settings")', False),
        ('importlib.import_module(f"services.{name}.service")', True),
        ('importlib.import_module("services.registry.store")', True),
        ('__import__(f"services.{name}.cli.helpers")', True),
        ("importlib.import_module(name)", True),
    ],
)
def test_the_importlib_check_tells_a_service_internal_from_its_app_and_cli(source: str, refused: bool) -> None:
    assert bool(importlib_offences(source)) is refused


# ------------------------------------------------------------------------------------------ contracts


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_contracts_import_only_pydantic_and_aiokafka() -> None:
    stdlib = set(sys.stdlib_module_names)
    offences = [
        f"{source.relative_to(ROOT)} imports {name}"
        for source in (ROOT / "contracts").rglob("*.py")
        for name in _imports(source)
        if name.split(".")[0] not in CONTRACTS_MAY_IMPORT | stdlib | {"__future__"}
    ]
    assert not offences, "\n".join(offences)
