"""The monitor's state between restarts: small JSON files under FLYWHEEL_HOME/monitor, one per concern
(retraining.json: which retrainings were asked for; canaries.json: which canaries are watched). Their
layouts belong to the modules that use them; this one only keeps each file whole and its writers apart."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


class JsonState:
    """One JSON object in one file, replaced whole on each write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # The stage.changed handler and the tick both rewrite the canary watch list, from worker threads.
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        """The stored object; empty when nothing was stored yet."""
        with self._lock:
            return self._read()

    def write(self, value: dict[str, Any]) -> None:
        with self._lock:
            self._write(value)

    def update(self, change: Callable[[dict[str, Any]], bool]) -> None:
        """Read, let `change` edit the object in place, and write it back when `change` says it changed it."""
        with self._lock:
            value = self._read()
            if change(value):
                self._write(value)

    def _read(self) -> dict[str, Any]:
        try:
            value: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return value

    def _write(self, value: dict[str, Any]) -> None:
        # Write-then-rename: a crash mid-write leaves the previous state, never half a file.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(value))
        temporary.replace(self.path)
