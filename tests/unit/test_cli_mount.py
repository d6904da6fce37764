"""The `flywheel` command mounts every service's commands, found by name: a service whose cli.py the lookup
misses would lose its commands silently, with `flywheel --help` still fine."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import typer

from services.cli.main import app
from services.cli.service_commands import benchmarks, service_clis

pytestmark = pytest.mark.unit


def _paths(command: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if hasattr(command, "commands"):  # a group (typer carries its own copy of click: no isinstance check)
        return {path for name, sub in command.commands.items() for path in _paths(sub, (*prefix, name))}
    return {prefix}


def test_every_service_with_commands_is_found_by_name() -> None:
    assert [module.__name__ for module in service_clis()] == [
        f"services.{name}.cli" for name in ("registry", "trainer", "evaluator", "serving", "feedback", "monitor")
    ]


def _declared(commands: typer.Typer, prefix: tuple[str, ...]) -> set[tuple[str, ...]]:
    # Read from the Typer itself: built into a click command, a Typer of one command is that command.
    names = {
        (*prefix, command.name or typer.main.get_command_name(command.callback.__name__))
        for command in commands.registered_commands
        if command.callback
    }
    return names.union(
        *(
            _declared(group.typer_instance, (*prefix, group.name))
            for group in commands.registered_groups
            if group.name and group.typer_instance
        )
    )


def test_each_command_a_service_declares_is_mounted_under_its_group() -> None:
    mounted = _paths(typer.main.get_command(app))
    for module in service_clis():
        declared = _declared(module.app, ())
        assert declared, f"{module.__name__} declares no command"
        assert declared <= mounted, f"{module.__name__}: not mounted: {sorted(declared - mounted)}"


def test_the_groups_that_span_services_hold_each_ones_commands_with_their_names() -> None:
    mounted = _paths(typer.main.get_command(app))
    monitor = {("ops", name) for name in ("traffic", "latency", "feedback", "alerts", "drift", "models", "sql")}
    assert monitor | {("ops", "replay")} <= mounted
    assert {("bench", name) for name in ("all", "train", "serve", "ingest")} <= mounted
    assert list(benchmarks()) == ["train", "serve", "gateway", "injection", "dtype", "ingest", "traces"]
    assert all(set(benchmark.sizes) == {"quick", "full"} for benchmark in benchmarks().values())


# What a process assembly or a model needs, and no command's lookup: imported by the commands that use them,
# so that `flywheel --help`, and every short command a person or a script runs, starts in under a second.
HEAVY = ("torch", "transformers", "fastapi", "faststream", "psycopg", "alembic", "onnxruntime", "chdb")


def test_mounting_every_command_imports_no_framework_and_no_model() -> None:
    probe = "import sys, services.cli.main; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    )
    assert sorted(name for name in HEAVY if name in loaded) == []
