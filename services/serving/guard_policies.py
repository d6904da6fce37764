"""Which guard policy a call gets, from the `guard_policy.activated` events serving has seen.

Event-carried state, like routes.py and prompt_routes.py: the registry publishes a policy version when it
becomes the active one (published active, or a rollback), every replica replays the topic from its start,
and the latest event per attachment wins. A policy is attached to a whole model, to one of its routes or
to the model's calls that use one registry prompt; a call gets the most specific of those that exist
(its prompt's, then its route's, then its model's). A call none names is guarded by the gateway's own
settings (`FLYWHEEL_SERVING_GUARD_*`).
"""

from __future__ import annotations

from contracts.events import GuardPolicyActivated

# Where a policy attaches within its model: the whole model, a route, a prompt (the registry's attached_to).
WHOLE_MODEL = ""


class GuardPolicies:
    """The active registry guard policy of each model, route and prompt."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, str], GuardPolicyActivated] = {}

    def activate(self, event: GuardPolicyActivated) -> None:
        self._active[(event.model_name, _attached_to(event))] = event

    def active_for(
        self, model_name: str, route: str | None = None, prompt_name: str | None = None
    ) -> GuardPolicyActivated | None:
        """The policy that decides a call to `model_name` on `route` with `prompt_name`: the most specific."""
        candidates = (
            f"prompt:{prompt_name}" if prompt_name else None,
            f"route:{route}" if route else None,
            WHOLE_MODEL,
        )
        for attached_to in candidates:
            if attached_to is not None and (event := self._active.get((model_name, attached_to))) is not None:
                return event
        return None


def _attached_to(event: GuardPolicyActivated) -> str:
    if event.prompt_name is not None:
        return f"prompt:{event.prompt_name}"
    return f"route:{event.route.value}" if event.route is not None else WHOLE_MODEL
