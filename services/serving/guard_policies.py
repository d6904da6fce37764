"""Which guard policy a model's calls get, from the `guard_policy.activated` events serving has seen.

Event-carried state, like routes.py and prompt_routes.py: the registry publishes a policy version when it
becomes a model's active one (published active, or a rollback), every replica replays the topic from its
start, and the latest event per model wins. A model no registry policy names is guarded by the gateway's
own settings (`FLYWHEEL_SERVING_GUARD_*`).
"""

from __future__ import annotations

from contracts.events import GuardPolicyActivated


class GuardPolicies:
    """The active registry guard policy of each model."""

    def __init__(self) -> None:
        self._active: dict[str, GuardPolicyActivated] = {}

    def activate(self, event: GuardPolicyActivated) -> None:
        self._active[event.model_name] = event

    def active_for(self, model_name: str) -> GuardPolicyActivated | None:
        return self._active.get(model_name)
