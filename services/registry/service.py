"""The registry's use cases, one module per sub-domain, composed here over one store and one artifact store:

- base_models.py: base models;  adapters.py: adapter versions, their evaluations and stages;
- approvals.py: approvals of production promotions;  prompts.py: prompt versions and labels;
- guard_policies.py: guard policy versions and the active one of each;  rubrics.py: review rubric versions;
- datasets.py: dataset versions;  keys.py: API keys;
- changes.py: what every mutation shares (its transaction, its audit entry, the outbox kick) and the audit log;
- store.py: the database and its queries;  errors.py: what the registry refuses.

None imports Kafka or FastAPI; the door (api.py), the handlers and the CLI translate. changes.py reads
the edge's status of a refusal (services.runtime.http.status_of), because a refused change's audit
entry records the status the door answers, whoever asked.
"""

from __future__ import annotations

from collections.abc import Callable

from services.registry.adapters import Adapters
from services.registry.approvals import Approvals
from services.registry.base_models import BaseModels
from services.registry.changes import Changes
from services.registry.datasets import Datasets
from services.registry.guard_policies import GuardPolicies
from services.registry.keys import Keys
from services.registry.prompts import Prompts
from services.registry.rubrics import Rubrics
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore


class Registry:
    """The registry's sub-domains built once over one store: the door, the handlers, the CLI and the
    tests call `registry.adapters.transition(...)`, `registry.prompts...` and so on."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        *,
        max_dataset_bytes: int = 64 * 1024 * 1024,
        on_commit: Callable[[], None] | None = None,
        key_pepper: bytes | None = None,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.changes = Changes(store, on_commit)
        self.approvals = Approvals(self.changes)
        self.models = BaseModels(self.changes, artifacts)
        self.adapters = Adapters(self.changes, artifacts, self.approvals)
        self.prompts = Prompts(self.changes, self.approvals)
        self.guard_policies = GuardPolicies(self.changes)
        self.rubrics = Rubrics(self.changes)
        self.datasets = Datasets(self.changes, artifacts, max_dataset_bytes=max_dataset_bytes)
        self.keys = Keys(self.changes, key_pepper=key_pepper)

    @property
    def max_dataset_bytes(self) -> int:
        return self.datasets.max_dataset_bytes

    @property
    def key_pepper(self) -> bytes:
        return self.keys.key_pepper
