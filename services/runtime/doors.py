"""What every client command that talks to a running service's door sends with it (the commands live in
each service's cli.py, so this is shared runtime, not the CLI's)."""

from __future__ import annotations

import os


def api_key_headers(api_key: str | None = None) -> dict[str, str]:
    """The bearer header for `api_key`, else for FLYWHEEL_API_KEY; none when neither is set (the door answers 401)."""
    key = api_key or os.environ.get("FLYWHEEL_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}
