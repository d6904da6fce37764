"""Console sign-ins, kept in this process's memory: the browser's cookie holds only a random id, never the API key."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConsoleSession:
    """One sign-in: who, with which key (kept here to re-check revocation on every page), its CSRF token, and when it ends."""

    principal: str
    key_id: str
    key: str = field(repr=False)
    csrf: str = field(repr=False)
    expires_at: float = 0.0


class ConsoleSessions:
    """Server-side console sessions: the browser's cookie holds only a random id, never the API key.

    In memory, so a restart signs everyone out (a console sign-in is cheap to repeat) and several
    replicas of a process behind one address need sticky sessions. Bounded: a flood of sign-ins evicts the
    sessions closest to their end rather than growing without limit.
    """

    def __init__(self, lifetime_s: int, *, max_sessions: int = 10_000, clock: Any = time.monotonic) -> None:
        self.lifetime_s = lifetime_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()

    def open(self, principal: str, key_id: str, key: str) -> tuple[str, ConsoleSession]:
        """A new session id (256 random bits) and its session."""
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(principal, key_id, key, secrets.token_urlsafe(32), self._clock() + self.lifetime_s)
        with self._lock:
            self._prune()
            while len(self._sessions) >= self._max:
                del self._sessions[min(self._sessions, key=lambda sid: self._sessions[sid].expires_at)]
            self._sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        """The live session with this id, or None (unknown, or expired: then forgotten)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= self._clock():
                del self._sessions[session_id]
                return None
            return session

    def close(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _prune(self) -> None:
        now = self._clock()
        for sid in [sid for sid, session in self._sessions.items() if session.expires_at <= now]:
            del self._sessions[sid]


def same_token(expected: str | None, presented: str | None) -> bool:
    """Constant-time comparison of CSRF tokens; a missing one never matches."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())
