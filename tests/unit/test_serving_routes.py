"""Model references resolve from the event-carried routes table."""

from __future__ import annotations

import pytest

from contracts.events import Stage
from services.serving.routes import Routes, UnknownModelError

pytestmark = pytest.mark.unit


def test_references_resolve_by_stage_and_version() -> None:
    routes = Routes()
    routes.add_model("m")
    assert (routes.resolve("m").adapter_version, routes.resolve("m").route) == (None, "direct")
    for version in (1, 2):
        routes.add_version("m", version, f"file:///v{version}", "0" * 64)
    routes.set_stage("m", 1, Stage.production)
    routes.set_stage("m", 2, Stage.staging)
    assert routes.resolve("m").label == "m:v1" and routes.resolve("m@production").route == "production"
    assert routes.resolve("m@staging").label == "m:v2" and routes.resolve("m:v1").route == "pinned"
    routes.set_stage("m", 2, Stage.production)
    assert routes.resolve("m").label == "m:v2"
    with pytest.raises(UnknownModelError, match="no version in staging"):
        routes.resolve("m@staging")
    for bad in ("nope", "m:v7", "m@archived", "m:x"):
        with pytest.raises(UnknownModelError):
            routes.resolve(bad)
    assert routes.references() == ["m", "m@production", "m:v1", "m:v2"]
