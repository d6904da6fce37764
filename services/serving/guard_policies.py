"""Which guard policy a call gets, from the `guard_policy.activated` events serving has seen.

Event-carried state, like routes.py and prompt_routes.py: the registry publishes a policy version when it
becomes the active one (published active, or a rollback), every replica replays the topic from its start,
and the latest event per attachment wins. A policy is attached to a whole model, to one of its routes or
to the model's calls that use one registry prompt; a call gets the most specific of those that exist
(its prompt's, then its route's, then its model's). A call none names is guarded by the gateway's own
settings (`FLYWHEEL_SERVING_GUARD_*`).
"""

from __future__ import annotations

from contracts.events import GuardPolicyActivated, guard_attachment


class GuardPolicies:
    """The active registry guard policy of each model, route and prompt."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, str], GuardPolicyActivated] = {}

    def activate(self, event: GuardPolicyActivated) -> None:
        self._active[(event.model_name, event.attached_to)] = event

    def active_for(
        self, model_name: str, route: str | None = None, prompt_name: str | None = None
    ) -> GuardPolicyActivated | None:
        """The policy that decides a call to `model_name` on `route` with `prompt_name`: the most specific."""
        candidates = (
            guard_attachment(None, prompt_name) if prompt_name else None,
            guard_attachment(route, None) if route else None,
            guard_attachment(None, None),
        )
        for attached_to in candidates:
            if attached_to is not None and (event := self._active.get((model_name, attached_to))) is not None:
                return event
        return None
