"""Named failpoints for fault-injection tests: a point in the code where a test can make the process die.

`FLYWHEEL_FAILPOINTS` lists the points to arm, e.g. `consumer.batch.after_handler=crash@3`: the
third time the process passes that point it SIGKILLs itself, as a power cut would, so no `finally`,
no graceful stop and no offset commit runs. Without `@N` the first pass crashes. Unset (the
default, and in production) `hit` is one dict lookup on an empty dict.

The environment is read by `load`, which the consumers call when they are subscribed (so when an
app is built, not at import), and a malformed value stops the process at start.
"""

from __future__ import annotations

import logging
import os
import signal

from services.runtime.errors import ConfigurationError

log = logging.getLogger("flywheel.failpoints")

ENV = "FLYWHEEL_FAILPOINTS"
# The points the code defines; arming another name is a typo that would make a test pass for nothing.
POINTS = frozenset({
    # services/runtime/consumer.py: a batch is stored (the handler returned) and its offsets are not committed yet.
    "consumer.batch.after_handler",
})

_armed: dict[str, int] | None = None
_passes: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """`name=crash[@N],...` -> {name: N}; a ConfigurationError names what is wrong."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        kind, _, nth = action.partition("@")
        if name not in POINTS:
            raise ConfigurationError(f"{ENV}: unknown failpoint {name!r}; known: {', '.join(sorted(POINTS))}")
        if kind != "crash" or (nth and not nth.isdigit()) or nth == "0":
            raise ConfigurationError(f"{ENV}: {item!r} must read {name}=crash or {name}=crash@N with N >= 1")
        armed[name] = int(nth or 1)
    return armed


def load() -> dict[str, int]:
    """The armed failpoints, read from FLYWHEEL_FAILPOINTS once per process; ConfigurationError when malformed."""
    global _armed
    if _armed is None:
        _armed = parse(os.environ.get(ENV, ""))
    return _armed


def hit(name: str) -> None:
    """Pass failpoint `name`: nothing happens unless it is armed and this is its Nth pass."""
    armed = _armed if _armed is not None else load()
    if name not in armed:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == armed[name]:
        log.warning("failpoint %s: crashing (pass %d)", name, _passes[name])
        os.kill(os.getpid(), signal.SIGKILL)
