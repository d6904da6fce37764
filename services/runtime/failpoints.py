"""Named failpoints for fault-injection tests: a point in the code where a test makes the process die or
a dependency stop answering. The one fault-injection mechanism of the platform.

`FLYWHEEL_FAILPOINTS` arms points, comma-separated, each `name=action`:

- `crash` or `crash@N`: the Nth time the process passes the point (the first without `@N`) it SIGKILLs
  itself, as a power cut would, so no `finally`, no graceful stop and no offset commit runs;
- `fail-while-exists:PATH`: every pass raises the error the code at the point names (what the real
  fault would raise) for as long as the file PATH exists, so a test starts and ends an outage at run
  time by creating and deleting the file, without restarting the process (embedded chDB cannot be
  stopped under the process that holds it). PATH may not contain a comma, the separator of the list.

Each point accepts only the actions it was written for: arming another name or action is a typo that
would make a test pass for nothing, and is refused naming the fix. Unset (the default, and in
production) `hit` is one dict lookup on an empty dict.

The environment is read by `load`, which the code defining a point calls when its service is built
(not at import), so a malformed value stops the process at start.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from services.runtime.errors import ConfigurationError

log = logging.getLogger("flywheel.failpoints")

ENV = "FLYWHEEL_FAILPOINTS"
CRASH = "crash"
FAIL_WHILE_EXISTS = "fail-while-exists"
# The points the code defines, each with the actions its fault tests arm it with.
POINTS: dict[str, frozenset[str]] = {
    # services/runtime/consumer.py: a batch is stored (the handler returned) and its offsets are not committed yet.
    "consumer.batch.after_handler": frozenset({CRASH}),
    # services/feedback/store.py: before each statement the sink or the feedback door sends to ClickHouse.
    "feedback.clickhouse_unavailable": frozenset({FAIL_WHILE_EXISTS}),
}
_GRAMMAR = {CRASH: "{name}=crash or {name}=crash@N with N >= 1", FAIL_WHILE_EXISTS: "{name}=fail-while-exists:PATH"}


@dataclass(frozen=True)
class Armed:
    """What an armed point does: crash on its `nth` pass, or fail while `path` exists."""

    action: str
    nth: int = 1
    path: Path | None = None


_armed: dict[str, Armed] | None = None
_passes: dict[str, int] = {}


def parse(spec: str) -> dict[str, Armed]:
    """`name=action,...` -> {name: Armed}; a ConfigurationError names what is wrong and how the item should read."""
    armed: dict[str, Armed] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        if name not in POINTS:
            raise ConfigurationError(f"{ENV}: unknown failpoint {name!r}; known: {', '.join(sorted(POINTS))}")
        armed[name] = _action(name, item, action)
    return armed


def _action(name: str, item: str, action: str) -> Armed:
    allowed = POINTS[name]
    if CRASH in allowed:
        kind, at, nth = action.partition("@")
        if kind == CRASH and (not at or (nth.isdigit() and int(nth) >= 1)):
            return Armed(CRASH, nth=int(nth) if at else 1)
    if FAIL_WHILE_EXISTS in allowed:
        kind, _, path = action.partition(":")
        if kind == FAIL_WHILE_EXISTS and path.strip():
            return Armed(FAIL_WHILE_EXISTS, path=Path(path.strip()))
    forms = " or ".join(_GRAMMAR[known].format(name=name) for known in sorted(allowed))
    raise ConfigurationError(f"{ENV}: {item!r} must read {forms}")


def load() -> dict[str, Armed]:
    """The armed failpoints, read from FLYWHEEL_FAILPOINTS once per process; ConfigurationError when malformed."""
    global _armed
    if _armed is None:
        _armed = parse(os.environ.get(ENV, ""))
    return _armed


def arm(spec: str) -> None:
    """Arm `spec` in this process instead of what FLYWHEEL_FAILPOINTS says, counting passes afresh: for a
    test that drives the code in its own process (a process under test is armed by the variable)."""
    global _armed
    _armed = parse(spec)
    _passes.clear()


def hit(name: str, raises: type[Exception] = RuntimeError) -> None:
    """Pass failpoint `name`: nothing happens unless it is armed; then it crashes on its Nth pass, or raises
    `raises` (the error the real fault would cause at this point) while its file exists."""
    armed = _armed if _armed is not None else load()
    point = armed.get(name)
    if point is None:
        return
    if point.action == FAIL_WHILE_EXISTS:
        if point.path is not None and point.path.exists():
            raise raises(f"failpoint {name}: {point.path} exists, so this point fails as the real fault would")
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == point.nth:
        log.warning("failpoint %s: crashing (pass %d)", name, _passes[name])
        os.kill(os.getpid(), signal.SIGKILL)
