"""The registry's use cases, one module per sub-domain, composed here over one store and one artifact store:

- base_models.py: base models;  adapters.py: adapter versions, their evaluations and stages;
- approvals.py: approvals of production promotions;  prompts.py: prompt versions and labels;
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
from services.registry.keys import Keys
from services.registry.prompts import Prompts
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore


class Registry:
    """The registry's sub-domains built once over one store: the door, the handlers and the CLI call
    `registry.adapters.transition(...)`, `registry.prompts...` and so on.

    It also answers the use cases by their old names (`registry.transition(...)`), bound to the
    sub-domain that owns each: the one object the tests and the monitor's in-process door built
    before the split, kept so that the split changes no caller outside the registry at once.
    """

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
        self.datasets = Datasets(self.changes, artifacts, max_dataset_bytes=max_dataset_bytes)
        self.keys = Keys(self.changes, key_pepper=key_pepper)

        self.register_base_model = self.models.register_base_model
        self.get_model = self.models.get_model
        self.list_models = self.models.list_models
        self.register_adapter = self.adapters.register_adapter
        self.register_trained_adapter = self.adapters.register_trained_adapter
        self.get_adapter = self.adapters.get_adapter
        self.list_adapters = self.adapters.list_adapters
        self.lineage = self.adapters.lineage
        self.attach_evaluation = self.adapters.attach_evaluation
        self.transition = self.adapters.transition
        self.approve = self.approvals.approve
        self.list_approvals = self.approvals.list_approvals
        self.publish_prompt = self.prompts.publish_prompt
        self.set_prompt_label = self.prompts.set_prompt_label
        self.get_prompt = self.prompts.get_prompt
        self.list_prompts = self.prompts.list_prompts
        self.render_prompt = self.prompts.render_prompt
        self.publish_dataset = self.datasets.publish_dataset
        self.get_dataset = self.datasets.get_dataset
        self.list_datasets = self.datasets.list_datasets
        self.dataset_rows = self.datasets.dataset_rows
        self.create_api_key = self.keys.create_api_key
        self.rotate_api_key = self.keys.rotate_api_key
        self.list_api_keys = self.keys.list_api_keys
        self.revoke_api_key = self.keys.revoke_api_key
        self.audit = self.changes.entries

    @property
    def max_dataset_bytes(self) -> int:
        return self.datasets.max_dataset_bytes

    @property
    def key_pepper(self) -> bytes:
        return self.keys.key_pepper
