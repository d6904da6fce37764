"""No code path under services/ writes the process environment: settings are built once by the
composition root and passed in (services/runtime/service.py build_process), so nothing configures a
service by setting a variable for it to read later.

The scan reads every module's syntax tree for the ways Python writes the environment: assigning or
deleting an `os.environ` item, `os.environ.update/setdefault/pop/popitem/clear`, `os.putenv`,
`os.unsetenv`, also through `from os import environ` or an alias of `os`.
"""

from __future__ import annotations

import ast
import os
from functools import partial
from pathlib import Path

import pytest

from services.cli.run_cmd import SERVICES, factory

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MUTATORS = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}

# Each exception names why it cannot pass an environment instead.
ALLOWED = {
    # PyTriton 0.7 builds tritonserver's environment from os.environ.copy() inside a private method
    # (pytriton.server.triton_server.TritonServer._get_env) and takes none as a parameter; the Python
    # backend stubs tritonserver starts need Python's LIBDIR on LD_LIBRARY_PATH to load libpython.
    ("services/serving/triton.py", "os.environ['LD_LIBRARY_PATH'] ="),
}


class EnvironmentWrites(ast.NodeVisitor):
    """Collects (line, what) for each write of the environment in one module."""

    def __init__(self) -> None:
        self.os_names = {"os"}
        self.environ_names: set[str] = set()
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.os_names |= {alias.asname or alias.name for alias in node.names if alias.name == "os"}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "os":
            for alias in node.names:
                if alias.name == "environ":
                    self.environ_names.add(alias.asname or alias.name)
                elif alias.name in ("putenv", "unsetenv"):
                    self.os_names.add(alias.asname or alias.name)  # called bare: recognised below by name

    def is_environ(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            return isinstance(node.value, ast.Name) and node.value.id in self.os_names
        return isinstance(node, ast.Name) and node.id in self.environ_names

    def item(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Subscript) and self.is_environ(node.value):
            return f"os.environ[{ast.unparse(node.slice)}]"
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        self.found += [(node.lineno, f"{written} =") for target in node.targets if (written := self.item(target))]
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if written := self.item(node.target):
            self.found.append((node.lineno, f"{written} +="))
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        self.found += [(node.lineno, f"del {written}") for target in node.targets if (written := self.item(target))]
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        if isinstance(function, ast.Attribute):
            if function.attr in MUTATORS and self.is_environ(function.value):
                self.found.append((node.lineno, f"os.environ.{function.attr}()"))
            elif (
                function.attr in ("putenv", "unsetenv")
                and isinstance(function.value, ast.Name)
                and function.value.id in self.os_names
            ):
                self.found.append((node.lineno, f"os.{function.attr}()"))
        elif isinstance(function, ast.Name) and function.id in ("putenv", "unsetenv") and function.id in self.os_names:
            self.found.append((node.lineno, f"os.{function.id}()"))
        self.generic_visit(node)


def environment_writes(source: str) -> list[tuple[int, str]]:
    visitor = EnvironmentWrites()
    visitor.visit(ast.parse(source))
    return visitor.found


def test_no_module_under_services_writes_the_environment() -> None:
    found = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for line, what in environment_writes(path.read_text()):
            if (relative, what) not in ALLOWED:
                found.append(f"{relative}:{line}: {what}")
    assert found == [], "build settings objects and pass them in instead of writing the environment:\n" + "\n".join(
        found
    )


def test_every_allowed_write_still_exists() -> None:
    """An exception whose write is gone is removed from ALLOWED, so it cannot cover a new one."""
    for relative, what in ALLOWED:
        assert what in [written for _, written in environment_writes((ROOT / relative).read_text())], (relative, what)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os\nos.environ['A'] = '1'", "os.environ['A'] ="),
        ("import os\nos.environ['A'] += '1'", "os.environ['A'] +="),
        ("import os\ndel os.environ['A']", "del os.environ['A']"),
        ("import os\nos.environ.update({'A': '1'})", "os.environ.update()"),
        ("import os\nos.environ.setdefault('A', '1')", "os.environ.setdefault()"),
        ("import os\nos.environ.pop('A', None)", "os.environ.pop()"),
        ("import os\nos.putenv('A', '1')", "os.putenv()"),
        ("import os as system\nsystem.environ['A'] = '1'", "os.environ['A'] ="),
        ("from os import environ\nenviron.update(A='1')", "os.environ.update()"),
        ("from os import environ as env\nenv['A'] = '1'", "os.environ['A'] ="),
        ("from os import putenv\nputenv('A', '1')", "os.putenv()"),
    ],
)
def test_the_scan_finds_each_way_of_writing(source: str, expected: str) -> None:
    assert [what for _, what in environment_writes(source)] == [expected]


@pytest.mark.parametrize(
    "source",
    [
        "import os\nvalue = os.environ.get('A')",
        "import os\nchild = {**os.environ, 'A': '1'}",
        "import os\nchild = dict(os.environ)\nchild['A'] = '1'\nchild.update(B='2')",
        "settings = {}\nsettings['environ'] = 1",
    ],
)
def test_reading_or_copying_the_environment_is_not_a_write(source: str) -> None:
    assert environment_writes(source) == []


def test_the_demo_hands_each_service_its_settings_and_writes_no_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.demo import process, recipe
    from services.runtime.settings import FlywheelSettings

    monkeypatch.setenv("FLYWHEEL_MONITOR_TICK_S", "60")  # the demo's value wins over the environment's ...
    monkeypatch.setenv(
        "FLYWHEEL_SERVING_MAX_TOKENS_LIMIT", "77"
    )  # ... which still gives everything the demo does not set
    # The service modules load first: torch, as it loads, records TORCHINDUCTOR_CACHE_DIR in the
    # environment itself; what is compared is what the demo does.
    for name in SERVICES:
        factory(name)
    before = dict(os.environ)
    settings, admin_key, factories = process.configure(FlywheelSettings(home=tmp_path, kafka_bootstrap="127.0.0.1:9"))
    assert dict(os.environ) == before
    assert settings.bootstrap_admin_key is not None and settings.bootstrap_admin_key.get_secret_value() == admin_key
    handed = {
        bound.func.__module__.split(".")[1]: bound.keywords["settings"]
        for bound in factories
        if isinstance(bound, partial)
    }
    assert sorted(handed) == sorted(SERVICES) == sorted(bound.func.__module__.split(".")[1] for bound in factories)
    monitor = handed["monitor"]
    assert (monitor.tick_s, monitor.api_key, monitor.rules_path) == (5, admin_key, tmp_path / "demo" / "rules.yaml")
    assert (monitor.retrain_min_corrections, monitor.retrain_correction_repeats) == (
        recipe.MIN_CORRECTIONS,
        recipe.CORRECTION_REPEATS,
    )
    assert (handed["trainer"].checkpoint_every, handed["trainer"].progress_every) == (2, 1)
    assert (handed["evaluator"].gate_policies, handed["evaluator"].max_tokens) == (
        {recipe.MODEL: recipe.GATE_POLICY},
        40,
    )
    assert (
        handed["serving"].rate_limit_rps,
        handed["serving"].rate_limit_burst,
        handed["serving"].max_tokens_limit,
    ) == (50, 100, 77)
