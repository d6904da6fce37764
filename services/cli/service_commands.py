"""Each service's commands, found by name: `services.<name>.cli`, as run_cmd.py finds `services.<name>.app`.

The one place the CLI looks a service's commands up, so the CLI imports no service module directly and a
service adds commands by adding its cli.py. A service's `app` holds its commands by `flywheel` group: a
group of its own (`registry`, `train`, ...) is mounted as it is; a group several services add commands to
(`ops`, `bench`) is the CLI's, and gets theirs.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING

import typer

from services.cli.run_cmd import SERVICES

if TYPE_CHECKING:
    from services.runtime.bench import Benchmark


def service_cli(name: str) -> ModuleType | None:
    """The service's cli module; None when the service has no commands or is not part of this installation."""
    if importlib.util.find_spec(f"services.{name}") is None or importlib.util.find_spec(f"services.{name}.cli") is None:
        return None
    return importlib.import_module(f"services.{name}.cli")


def service_clis() -> list[ModuleType]:
    return [module for module in map(service_cli, SERVICES) if module is not None]


def mount(root: typer.Typer, shared: dict[str, typer.Typer]) -> None:
    """Add every service's command groups to `root`; the groups named in `shared` get the commands of each
    service that adds to them (they are mounted on `root` by the caller, with their own help)."""
    mounted = {group.name for group in root.registered_groups} | {command.name for command in root.registered_commands}
    for module in service_clis():
        for group in module.app.registered_groups:
            commands = group.typer_instance
            if group.name in shared:
                shared[group.name].registered_commands.extend(commands.registered_commands)
                shared[group.name].registered_groups.extend(commands.registered_groups)
            elif group.name in mounted:
                raise RuntimeError(f"{module.__name__} adds a `flywheel {group.name}` group, but that name is taken")
            else:
                root.add_typer(commands, name=group.name)
                mounted.add(group.name)


def benchmarks() -> dict[str, Benchmark]:
    """The benchmarks of `flywheel bench all`, by name: those each service's cli.py declares in its BENCHMARKS."""
    return {benchmark.name: benchmark for module in service_clis() for benchmark in getattr(module, "BENCHMARKS", ())}
