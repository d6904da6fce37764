"""What every client of a running service's door sends with it: the bearer header, built here and nowhere
else (the client commands in each service's cli.py, the registry client, the monitor's own door); and
`call_door`, the client commands' one way to ask the process running here."""

from __future__ import annotations

import os
from typing import Any


def bearer_header(api_key: str | None) -> dict[str, str]:
    """The bearer header for exactly `api_key`; none without a key (the door then answers 401)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def api_key_headers(api_key: str | None = None) -> dict[str, str]:
    """The bearer header for `api_key`, else for FLYWHEEL_API_KEY; none when neither is set (the door answers 401)."""
    return bearer_header(api_key or os.environ.get("FLYWHEEL_API_KEY"))


def call_door(
    method: str,
    path: str,
    body: Any = None,
    *,
    service: str,
    timeout_s: float = 30.0,
    base_url: str | None = None,
    api_key: str | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """`path` on the door of the process running here (FLYWHEEL_HTTP_HOST and _PORT, or `base_url`), sent
    with `api_key` or else FLYWHEEL_API_KEY: the answer's JSON, None for a 204. A FlywheelError says what
    failed: the door's own message when it refused, how to start `service` when nothing answered."""
    import httpx

    from services.runtime.errors import FlywheelError
    from services.runtime.settings import FlywheelSettings, load_settings

    if base_url is None:
        settings = load_settings(FlywheelSettings)
        base_url = f"http://{settings.http_host}:{settings.http_port}"
    url = f"{base_url.rstrip('/')}{path}"
    try:
        response = httpx.request(
            method, url, json=body, params=params, headers=api_key_headers(api_key), timeout=timeout_s
        )
    except httpx.HTTPError as error:
        raise FlywheelError(
            f"cannot reach the {service} at {url} ({type(error).__name__}): is `flywheel up` or `flywheel run {service}` running?"
        ) from None
    if response.status_code == 204:
        return None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise FlywheelError(f"{method} {url} answered {response.status_code}: {message}")
    return response.json()
