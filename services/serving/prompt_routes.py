"""Which prompt version a `prompt_ref` means, from the `prompt.published` events serving has seen.

Event-carried state, like routes.py: the registry re-publishes a version's `prompt.published` with
its current labels whenever a label moves, so the last event naming a label says where it points.
A reference without version or label means the `production` label, else the latest version.

Prompt A/B: while a prompt's `production` label and its A/B label (`candidate` by default) point
at different versions, `FLYWHEEL_SERVING_PROMPT_AB_PERCENT` of the production traffic, sticky per
user, gets the candidate. The registry declares which version is the candidate; the share is a
serving setting because `prompt.published` carries no percentage (see the README).
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


class PromptRoutes:
    def __init__(self, *, ab_label: str = "candidate", ab_percent: float = 0.0) -> None:
        self._prompts: dict[str, _Prompt] = {}
        self._lock = threading.Lock()
        self._ab_label = ab_label
        self._ab_percent = ab_percent

    def publish(self, event: PromptPublished) -> None:
        with self._lock:
            prompt = self._prompts.setdefault(event.prompt_name, _Prompt())
            prompt.versions[event.version] = event
            for label in event.labels:
                prompt.labels[label] = event.version

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
            candidate = prompt.labels.get(self._ab_label)
            if label == PRODUCTION and candidate not in (None, version) and bucket(sticky_key, f"prompt:{reference.name}") < self._ab_percent:
                return self._choice(prompt.versions[candidate], "ab")
            return self._choice(prompt.versions[version], "label")

    @staticmethod
    def _choice(event: PromptPublished, route: str) -> PromptChoice:
        return PromptChoice(event.prompt_name, event.version, event.template, tuple(event.variables), route)
