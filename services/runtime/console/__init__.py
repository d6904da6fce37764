"""The web console shared by every service: sign-in, sessions, layout, navigation and CSRF (console.py)."""

from services.runtime.console.console import (
    Console,
    ConsoleRefused,
    ConsoleUser,
    checked,
    Section,
    SignInRequired,
    cookie_name,
    local_path,
)
from services.runtime.console.sessions import ConsoleSession, ConsoleSessions, same_token

__all__ = [
    "Console",
    "ConsoleRefused",
    "ConsoleSession",
    "ConsoleSessions",
    "ConsoleUser",
    "Section",
    "SignInRequired",
    "checked",
    "cookie_name",
    "local_path",
    "same_token",
]
