"""One client for the registry's HTTP door (`/registry/v1/...`), for the services and commands that call it.

Each endpoint is described once (`_Call`: method, path, parameters, the status it answers with and the
contract model it returns) and sent by either client: `RegistryClient` for code on an event loop (the
monitor), `RegistrySyncClient` for commands. Answers come back as the models in contracts/http.py;
every failure, a refusal or a registry that cannot be reached, is one `RegistryError` carrying the
door's own message and code. The bearer header is built by services/runtime/doors.py.

Each call opens its own short-lived httpx client: the callers ask a few questions a minute, so there
is no pooled connection to keep alive or to close when a service stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter, ValidationError

from contracts.events import Stage
from contracts.http import (
    AdapterVersionView,
    DatasetCreate,
    DatasetVersionView,
    ErrorResponse,
    LineageView,
    Page,
    RubricCreate,
    RubricVersionView,
    StageTransition,
)
from services.runtime.doors import bearer_header

T = TypeVar("T")

PREFIX = "/registry/v1"
DEFAULT_TIMEOUT_S = 30.0
# The registry's largest page of dataset rows (GET .../rows?limit=).
ROWS_PAGE_MAX = 10_000

_ADAPTER = TypeAdapter(AdapterVersionView)
_ADAPTER_PAGE = TypeAdapter(Page[AdapterVersionView])
_DATASET = TypeAdapter(DatasetVersionView)
_LINEAGE = TypeAdapter(LineageView)
_ROWS = TypeAdapter(list[dict[str, Any]])
_RUBRIC = TypeAdapter(RubricVersionView)


class RegistryError(Exception):
    """The registry refused a request (`status`, and the door's `code` when it gave one) or could not be
    reached (`status` is None); the message is the door's own, prefixed with the request."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def refused(self) -> bool:
        """The registry answered and said no (as opposed to not answering at all)."""
        return self.status is not None


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request to the door and how to read its answer."""

    method: str
    path: str
    answer: TypeAdapter[T]
    ok: int = 200
    params: dict[str, Any] | None = None
    json: Any = None

    def request(self) -> dict[str, Any]:
        params = {name: value for name, value in (self.params or {}).items() if value is not None}
        return {"method": self.method, "url": PREFIX + self.path, "params": params or None, "json": self.json}

    def read(self, response: httpx.Response) -> T:
        if response.status_code != self.ok:
            raise _refusal(self, response)
        try:
            return self.answer.validate_json(response.content)
        except ValidationError as error:
            raise RegistryError(
                f"{self.method} {PREFIX}{self.path}: the registry's answer is not what this client expects ({error.error_count()} errors, first: {error.errors()[0]['msg']})",
                status=response.status_code,
            ) from None


def _refusal(call: _Call[Any], response: httpx.Response) -> RegistryError:
    try:
        detail = ErrorResponse.model_validate_json(response.content).error
        message, code = detail.message, detail.code
    except ValidationError:
        # Not the door's error body (a proxy in front of it, a crash page): its first bytes say more than nothing.
        message, code = response.text[:500] or response.reason_phrase, None
    return RegistryError(
        f"registry refused {call.method} {PREFIX}{call.path} ({response.status_code}): {message}",
        status=response.status_code,
        code=code,
    )


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


def _adapters(
    model_name: str | None, stage: Stage | None, limit: int, cursor: str | None
) -> _Call[Page[AdapterVersionView]]:
    params = {"model_name": model_name, "stage": stage.value if stage else None, "limit": limit, "cursor": cursor}
    return _Call("GET", "/adapters", _ADAPTER_PAGE, params=params)


def _lineage(model_name: str, version: int) -> _Call[LineageView]:
    return _Call("GET", f"/adapters/{_segment(model_name)}/versions/{version}/lineage", _LINEAGE)


def _transition(model_name: str, version: int, body: StageTransition) -> _Call[AdapterVersionView]:
    return _Call(
        "POST",
        f"/adapters/{_segment(model_name)}/versions/{version}/transitions",
        _ADAPTER,
        json=body.model_dump(mode="json", exclude_none=True),
    )


def _publish_dataset(body: DatasetCreate) -> _Call[DatasetVersionView]:
    return _Call("POST", "/datasets", _DATASET, ok=201, json=body.model_dump(mode="json"))


def _dataset_rows(name: str, version: int, offset: int, limit: int) -> _Call[list[dict[str, Any]]]:
    return _Call(
        "GET", f"/datasets/{_segment(name)}/versions/{version}/rows", _ROWS, params={"offset": offset, "limit": limit}
    )


def _rubric(name: str, version: int | None) -> _Call[RubricVersionView]:
    path = f"/rubrics/{_segment(name)}" + (f"/versions/{version}" if version is not None else "")
    return _Call("GET", path, _RUBRIC)


def _publish_rubric(body: RubricCreate) -> _Call[RubricVersionView]:
    return _Call("POST", "/rubrics", _RUBRIC, ok=201, json=body.model_dump(mode="json"))


class _Door:
    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = bearer_header(api_key)
        self._timeout_s = timeout_s

    def use_key(self, api_key: str | None) -> None:
        """Present `api_key` from now on: for a key that exists only once the registry has started (the
        admin key it writes on a fresh development home)."""
        self._headers = bearer_header(api_key)

    def _unreachable(self, call: _Call[Any], error: httpx.TransportError) -> RegistryError:
        return RegistryError(
            f"cannot reach the registry at {self.base_url} ({call.method} {PREFIX}{call.path}): {type(error).__name__}: {error}"
        )


class RegistryClient(_Door):
    """The registry's door for code on an event loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s=timeout_s)
        self._transport = transport

    async def _send(self, call: _Call[T]) -> T:
        try:
            async with httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, transport=self._transport, timeout=self._timeout_s
            ) as client:
                response = await client.request(**call.request())
        except httpx.TransportError as error:
            raise self._unreachable(call, error) from error
        return call.read(response)

    async def adapters(
        self, *, model_name: str | None = None, stage: Stage | None = None, limit: int = 50, cursor: str | None = None
    ) -> Page[AdapterVersionView]:
        """One page of adapter versions, newest first, filtered by model and stage."""
        return await self._send(_adapters(model_name, stage, limit, cursor))

    async def lineage(self, model_name: str, version: int) -> LineageView:
        """Where an adapter version came from: base model, training job, dataset, evaluations."""
        return await self._send(_lineage(model_name, version))

    async def transition(self, model_name: str, version: int, body: StageTransition) -> AdapterVersionView:
        """Move an adapter version; the registry checks the gate and records the change in its audit log."""
        return await self._send(_transition(model_name, version, body))

    async def publish_dataset(self, body: DatasetCreate) -> DatasetVersionView:
        """Publish a new dataset version."""
        return await self._send(_publish_dataset(body))

    async def dataset_rows(self, name: str, version: int, *, page_size: int = ROWS_PAGE_MAX) -> list[dict[str, Any]]:
        """Every record of a dataset version, read page by page."""
        rows: list[dict[str, Any]] = []
        while True:
            page = await self._send(_dataset_rows(name, version, len(rows), page_size))
            rows.extend(page)
            if len(page) < page_size:
                return rows

    async def rubric(self, name: str, version: int | None = None) -> RubricVersionView:
        """A rubric version by number, else its latest."""
        return await self._send(_rubric(name, version))

    async def production_lineage(self, model_name: str) -> LineageView | None:
        """The lineage of `model_name`'s full production version (not a canary beside it); None when it has none."""
        page = await self.adapters(model_name=model_name, stage=Stage.production, limit=50)
        serving = [adapter for adapter in page.items if not adapter.canary_percent]
        if not serving:
            return None
        return await self.lineage(serving[0].model_name, serving[0].version)


class RegistrySyncClient(_Door):
    """The registry's door for commands (no event loop)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s=timeout_s)
        self._transport = transport

    def _send(self, call: _Call[T]) -> T:
        try:
            with httpx.Client(
                base_url=self.base_url, headers=self._headers, transport=self._transport, timeout=self._timeout_s
            ) as client:
                response = client.request(**call.request())
        except httpx.TransportError as error:
            raise self._unreachable(call, error) from error
        return call.read(response)

    def adapters(
        self, *, model_name: str | None = None, stage: Stage | None = None, limit: int = 50, cursor: str | None = None
    ) -> Page[AdapterVersionView]:
        """One page of adapter versions, newest first, filtered by model and stage."""
        return self._send(_adapters(model_name, stage, limit, cursor))

    def publish_dataset(self, body: DatasetCreate) -> DatasetVersionView:
        """Publish a new dataset version."""
        return self._send(_publish_dataset(body))

    def rubric(self, name: str, version: int | None = None) -> RubricVersionView:
        """A rubric version by number, else its latest."""
        return self._send(_rubric(name, version))

    def publish_rubric(self, body: RubricCreate) -> RubricVersionView:
        """Publish the next version of a rubric."""
        return self._send(_publish_rubric(body))
