"""What every client of a running service's door sends with it: the bearer header, built here and nowhere
else (the client commands in each service's cli.py, the registry client, the monitor's own door)."""

from __future__ import annotations

import os


def bearer_header(api_key: str | None) -> dict[str, str]:
    """The bearer header for exactly `api_key`; none without a key (the door then answers 401)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def api_key_headers(api_key: str | None = None) -> dict[str, str]:
    """The bearer header for `api_key`, else for FLYWHEEL_API_KEY; none when neither is set (the door answers 401)."""
    return bearer_header(api_key or os.environ.get("FLYWHEEL_API_KEY"))
