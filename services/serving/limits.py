"""Per-API-key rate limits: a token bucket per principal, refilled continuously.

A bucket holds up to `burst` requests and refills at `rate_per_s`; a request takes one token or is
refused with how long until one is there (the 429's Retry-After). Buckets live in this process:
with several replicas each enforces its own share, so the limit a key sees is per replica.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, *, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, principal: str) -> float:
        """0 when the request may go on, else the seconds to wait before the next one would."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(principal, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[principal] = (tokens - 1.0, now)
                return 0.0
            self._buckets[principal] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))
