"""Where a batch path spends its time: seconds summed per stage, measured per batch (a few clock reads
per batch of thousands of events, so it is always on). The sink's benchmark prints the split."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Seconds and batches per named stage; safe to share between the threads that store batches."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._counts[name] = self._counts.get(name, 0) + 1

    def split(self) -> dict[str, float]:
        """Seconds per stage, in the order the stages first ran."""
        with self._lock:
            return dict(self._seconds)

    def count(self, name: str) -> int:
        """How many times `name` ran: per batch for the sink's stages."""
        with self._lock:
            return self._counts.get(name, 0)

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._counts.clear()
