"""Which prompt version a `prompt_ref` means, from the `prompt.published` events serving has seen.

Event-carried state, like routes.py: the registry re-publishes a version's `prompt.published` with
its current labels whenever a label moves, so the last event naming a label says where it points.
A reference without version or label means the `production` label, else the latest version.

Prompt A/B, declared in the registry: a label with a traffic share (`PUT /prompts/{name}/labels/
{label}` with `traffic_percent`, carried on `prompt.published` as `label_traffic`) takes that
percent of the requests that ask for the production label, sticky per user, while it points at a
different version than production. Several such labels split it in the order they were first
seen, so declaring another split moves no user of an existing one; the rest stays on production.
Moving or re-declaring a label re-publishes its version, so serving follows without a restart or
an app change.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from contracts.events import PromptPublished
from contracts.http import PromptReference
from services.serving.routes import bucket

PRODUCTION = "production"


class UnknownPromptError(LookupError):
    """The reference names no prompt, version or label serving knows."""


@dataclass(frozen=True)
class PromptChoice:
    name: str
    version: int
    template: str
    variables: tuple[str, ...]
    route: str  # label, pinned, latest, ab


@dataclass
class _Prompt:
    versions: dict[int, PromptPublished] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    traffic: dict[str, float] = field(default_factory=dict)  # label -> A/B share of production traffic


class PromptRoutes:
    def __init__(self) -> None:
        self._prompts: dict[str, _Prompt] = {}
        self._lock = threading.Lock()

    def publish(self, event: PromptPublished) -> None:
        with self._lock:
            prompt = self._prompts.setdefault(event.prompt_name, _Prompt())
            prompt.versions[event.version] = event
            for label in event.labels:
                prompt.labels[label] = event.version
                prompt.traffic[label] = event.label_traffic.get(label, 0.0)

    def resolve(self, reference: PromptReference, sticky_key: str = "") -> PromptChoice:
        with self._lock:
            prompt = self._prompts.get(reference.name)
            if prompt is None or not prompt.versions:
                raise UnknownPromptError(f"prompt {reference.name!r} is not published")
            if reference.version is not None:
                if reference.version not in prompt.versions:
                    raise UnknownPromptError(f"prompt {reference.name!r} has no version {reference.version}")
                return self._choice(prompt.versions[reference.version], "pinned")
            label = reference.label or PRODUCTION
            version = prompt.labels.get(label)
            if version is None:
                if reference.label is not None:
                    raise UnknownPromptError(f"prompt {reference.name!r} has no label {label!r}")
                return self._choice(prompt.versions[max(prompt.versions)], "latest")
            if label == PRODUCTION:
                point, edge = bucket(sticky_key, f"prompt:{reference.name}"), 0.0
                for candidate, share in prompt.traffic.items():
                    if share and prompt.labels[candidate] != version:
                        edge += share
                        if point < edge:
                            return self._choice(prompt.versions[prompt.labels[candidate]], "ab")
            return self._choice(prompt.versions[version], "label")

    @staticmethod
    def _choice(event: PromptPublished, route: str) -> PromptChoice:
        return PromptChoice(event.prompt_name, event.version, event.template, tuple(event.variables), route)
