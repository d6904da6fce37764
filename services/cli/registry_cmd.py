"""The registry's `import-base` command for `flywheel demo`, which imports it from here: the registry's
commands live in services/registry/cli.py, found by name like every service's. Goes once the demo finds
them the same way."""

from __future__ import annotations

from services.cli.service_commands import service_cli

_registry_cli = service_cli("registry")
if _registry_cli is None:
    raise ImportError("the registry service is not part of this installation")
import_base = _registry_cli.import_base
