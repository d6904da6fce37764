"""Which adapter version a `model` field means, from the stage and registration events serving has seen.

Event-carried state: `adapter.registered` and `stage.changed` keep this table current, so resolving
a request never calls the registry. `name` is production (the base model when nothing is promoted),
`name@staging` the staging version, `name:v3` a pinned version.

A canary (a production version with `canary_percent` on its stage.changed) takes that share of the
traffic for `name` / `name@production`. The split is sticky: a request's bucket is a hash of its
sticky key (the request's `user`, else the API key's principal) and the model name, so one user
sees one version for as long as the split stands, and raising the percentage only moves users
from the stable version to the canary, never back.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from dataclasses import dataclass, field

from contracts.events import Stage

_REFERENCE = re.compile(r"^(?P<name>[^@:]+)(?:@(?P<stage>[a-z]+)|:v(?P<version>[0-9]+))?$")


class UnknownModelError(LookupError):
    """The reference names no model, stage or version serving knows."""


@dataclass(frozen=True)
class Route:
    model_name: str
    adapter_version: int | None
    route: str  # production, staging, pinned, canary, direct (the base model)

    @property
    def adapter_name(self) -> str | None:
        """The engine's name for the adapter: unique across models and versions."""
        return None if self.adapter_version is None else f"{self.model_name}:v{self.adapter_version}"

    @property
    def label(self) -> str:
        return self.adapter_name or self.model_name


@dataclass(frozen=True)
class DeferredStage:
    """A stage.changed for a version whose adapter.registered has not arrived yet. It is applied, after
    the load, when the registration arrives; until then the stage keeps pointing where it did, so
    nothing routes to an adapter this replica cannot load. `order` places it among the stage changes."""

    to_stage: Stage
    canary_percent: float | None
    order: int

    @property
    def slot(self) -> tuple[Stage, bool]:
        return self.to_stage, bool(self.canary_percent)


@dataclass
class _Model:
    versions: dict[int, tuple[str, str]] = field(default_factory=dict)  # version -> (artifact uri, sha256)
    stages: dict[Stage, int] = field(default_factory=dict)
    canary: tuple[int, float] | None = None  # (version, percent of production traffic)
    deferred: dict[int, DeferredStage] = field(default_factory=dict)


def bucket(sticky_key: str, scope: str) -> float:
    """A stable point in [0, 100) for this key within `scope` (a model or prompt name)."""
    digest = hashlib.sha256(f"{scope}\0{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class Routes:
    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._order = itertools.count()

    def add_model(self, model_name: str) -> None:
        with self._lock:
            self._models.setdefault(model_name, _Model())

    def add_version(
        self, model_name: str, version: int, artifact_uri: str, artifact_sha256: str
    ) -> DeferredStage | None:
        """Remember the version's artifact; returns the stage change deferred until now, if any, for the
        caller to load and then apply with set_stage (it stays deferred if the load fails)."""
        with self._lock:
            model = self._models.setdefault(model_name, _Model())
            model.versions[version] = (artifact_uri, artifact_sha256)
            return model.deferred.get(version)

    def defer_stage_if_unknown(
        self, model_name: str, version: int, to_stage: Stage, canary_percent: float | None = None
    ) -> bool:
        """Hold a stage change for a version not registered yet (True), or do nothing when it is known (False)."""
        with self._lock:
            model = self._models.setdefault(model_name, _Model())
            if version in model.versions:
                return False
            model.deferred[version] = DeferredStage(to_stage, canary_percent, next(self._order))
            return True

    def set_stage(
        self,
        model_name: str,
        version: int,
        to_stage: Stage,
        canary_percent: float | None = None,
        *,
        deferred: DeferredStage | None = None,
    ) -> None:
        """Point `to_stage` at `version` (as the canary when `canary_percent` is set); a version leaving a
        stage frees it. `deferred`: this is that held stage change, applied now, in its place in the order."""
        with self._lock:
            model = self._models.setdefault(model_name, _Model())
            # What this change supersedes: a held change of the same version, and held changes of the same
            # slot that came before it (a deferred promotion applied late must not drop a newer one).
            change = deferred or DeferredStage(to_stage, canary_percent, next(self._order))
            model.deferred.pop(version, None)
            for waiting, held in list(model.deferred.items()):
                if held.slot == change.slot and held.order < change.order:
                    del model.deferred[waiting]
            for stage, current in list(model.stages.items()):
                if current == version:
                    del model.stages[stage]
            if model.canary is not None and model.canary[0] == version:
                model.canary = None
            if to_stage == Stage.production and canary_percent:
                model.canary = (version, canary_percent)
            elif to_stage in (Stage.staging, Stage.production):
                model.stages[to_stage] = version

    def artifact(self, model_name: str, version: int) -> tuple[str, str] | None:
        with self._lock:
            model = self._models.get(model_name)
            return None if model is None else model.versions.get(version)

    def resolve(self, reference: str, sticky_key: str = "") -> Route:
        match = _REFERENCE.match(reference.strip())
        if match is None:
            raise UnknownModelError(f"{reference!r} is not `name`, `name@stage` or `name:vN`")
        name = match["name"]
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise UnknownModelError(f"model {name!r} does not exist")
            if match["version"] is not None:
                version = int(match["version"])
                if version not in model.versions:
                    raise UnknownModelError(f"model {name!r} has no version {version}")
                return Route(name, version, "pinned")
            stage = match["stage"] or Stage.production.value
            if stage not in (Stage.staging.value, Stage.production.value):
                raise UnknownModelError(f"stage {stage!r} is not served: use production or staging")
            version = model.stages.get(Stage(stage))
            if stage == Stage.production.value and version is not None and model.canary is not None:
                canary, percent = model.canary
                if bucket(sticky_key, name) < percent:
                    return Route(name, canary, "canary")
            if version is not None:
                return Route(name, version, stage)
            if match["stage"] is None:
                return Route(name, None, "direct")
            raise UnknownModelError(f"model {name!r} has no version in {stage}")

    def references(self) -> list[str]:
        """Every reference a client may put in `model`, for /v1/models."""
        with self._lock:
            out = []
            for name, model in sorted(self._models.items()):
                out.append(name)
                out.extend(f"{name}@{stage.value}" for stage in sorted(model.stages))
                out.extend(f"{name}:v{version}" for version in sorted(model.versions))
            return out
