"""Structured logging for every process: one configuration, chosen by settings, applied once.

Per-message chatter (FastStream's "Received"/"Processed", aiokafka's group bookkeeping) stays
below INFO, so an INFO log shows what changed, not what flowed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import structlog

from services.runtime.settings import FlywheelSettings

# aiokafka warns "Marking the coordinator dead" while a fresh broker creates __consumer_offsets: noise.
_QUIET = {
    "aiokafka": logging.WARNING,
    "aiokafka.consumer.group_coordinator": logging.ERROR,
    "flywheel.faststream": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "httpx": logging.WARNING,
    "urllib3": logging.ERROR,
}


# A fresh broker answers GroupCoordinatorNotAvailable until it has created __consumer_offsets; aiokafka
# retries on its own and logs every answer at ERROR, once per consumer group.
_COORDINATOR_STARTING = "GroupCoordinatorNotAvailableError"
COORDINATOR_GRACE_S = 60.0


class CoordinatorStarting(logging.Filter):
    """Drops aiokafka's GroupCoordinatorNotAvailable errors in a process's first minute, when they mean a
    broker still starting; after that they pass, since a coordinator missing that long is a real fault."""

    def __init__(self, grace_s: float = COORDINATOR_GRACE_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._until = clock() + grace_s

    def filter(self, record: logging.LogRecord) -> bool:
        return self._clock() >= self._until or _COORDINATOR_STARTING not in record.getMessage()


def configure_logging(settings: FlywheelSettings) -> None:
    """Route stdlib and structlog records through one renderer (console or JSON) on stderr."""
    json_output = settings.log_format == "json"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=_exception_formatter(sys.stderr.isatty())
        )
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json_output else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(max(level, root.level))
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.filters[:] = [f for f in coordinator.filters if not isinstance(f, CoordinatorStarting)]
    coordinator.addFilter(CoordinatorStarting())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _exception_formatter(terminal: bool) -> structlog.typing.ExceptionRenderer:
    # structlog's default is rich with every frame's locals: one failed tick of the monitor filled
    # screens with a pandas frame and a settings object. Type, message and stack are what a person reads;
    # a log file gets Python's own format, which grep and editors understand, rather than rich's boxes.
    if terminal:
        return structlog.dev.RichTracebackFormatter(show_locals=False, extra_lines=0, max_frames=20)
    return structlog.dev.plain_traceback


def _identity(logger: object, name: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    return event_dict


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
