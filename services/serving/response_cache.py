"""The gateway's exact response cache: a repeated deterministic request is answered without the model.

A request is cacheable when its answer is a function of what it asks: greedy (`temperature: 0`) or
seeded sampling. The key is everything that decides the answer: the calling principal (answers are
not shared across API keys unless the model's guard policy says `cache_shared`), the guard policy
version, the endpoint, the version that serves it (base model or `name:vN`), the registered prompt's
name and version, the rendered model input, and every sampling parameter. A promotion, a rollback, a
new prompt version or a new guard policy version therefore changes the key, and the old answers are
never served for the new version; they age out.

Calls routed by an experiment (a canary's or an A/B split's arm) are always generated: the
experiment compares the arms' real answers and latencies. Only whole answers are kept (finished by
a stop or the length limit), never an error or a stream the client left.

A semantic cache (SemanticCache) sits behind the exact one for a guard policy that opts in
(`cache_semantic_threshold`, or `FLYWHEEL_SERVING_RESPONSE_CACHE_SEMANTIC_THRESHOLD` for models no registry
policy guards): the same request with its question put in other
words gets the stored answer when their MiniLM embeddings are similar enough. Everything but the
question must still be equal, so a promotion, a prompt version and another principal still miss.

Why not `cachetools`: a TTL on top of an LRU bound over an OrderedDict is the whole need, and the
gateway's event loop is its only user, so it needs no lock; a dependency would add nothing here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from services.serving.guard import GuardVerdict

CACHE_LOOKUPS = Counter(
    "flywheel_serving_cache_total",
    "Response cache lookups by outcome: hit, miss, bypass (the request asked not to be served from the cache), "
    "uncacheable (sampled, or routed by an experiment).",
    ["outcome"],
)
CACHE_ENTRIES = Gauge("flywheel_serving_cache_entries", "Answers held in the response cache.")

EXPERIMENT_ROUTES = frozenset({"canary", "ab"})


class CacheUse(StrEnum):
    """What a request lets the cache do, from its `Cache-Control` header (RFC 9111's request directives)."""

    normal = "normal"  # served from the cache when it can be, and stored
    refresh = "refresh"  # `no-cache`: always generated, the fresh answer stored
    off = "off"  # `no-store`: neither read nor stored

    @classmethod
    def from_header(cls, value: str | None) -> CacheUse:
        directives = {part.strip().lower() for part in (value or "").split(",")}
        if "no-store" in directives:
            return cls.off
        if "no-cache" in directives:
            return cls.refresh
        return cls.normal


@dataclass(frozen=True)
class CachedAnswer:
    """A whole answer as the gateway logged it, with the version that produced it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    source_inference_id: str
    screened: GuardVerdict | None = None  # the injection screen's verdict on this model input, when it ran


@dataclass(frozen=True)
class CacheKey:
    principal: str  # "" where the guard policy shares answers between keys
    guard_policy: str  # `name:vN`, or "" for the gateway's settings: a new policy version starts afresh
    structure: str  # the JSON Schema the answer was checked against, or "": checked against one, valid for it only
    context: str  # the grounding context it was checked against, or "": likewise
    endpoint: str
    served: str  # the version's label: the base model, or `name:vN`
    prompt: str  # the registered prompt as `name:vN`, or "" when the request named none
    model_input: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    def digest(self) -> bytes:
        """The key as 32 bytes: the rendered input can be kilobytes, and the cache holds only its hash."""
        return hashlib.sha256(json.dumps(dataclasses.astuple(self), ensure_ascii=False).encode()).digest()


def cacheable(temperature: float, seed: int | None, route: str) -> bool:
    """Whether the answer is determined by the request, and the call is not an experiment's."""
    return (temperature == 0 or seed is not None) and route not in EXPERIMENT_ROUTES


class ResponseCache:
    """At most `capacity` answers, each served for `ttl_s` after it was stored; the least recently used
    goes first when it is full. `capacity` 0 turns the cache off."""

    def __init__(self, *, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, CachedAnswer]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> CachedAnswer | None:
        digest = key.digest()
        entry = self._entries.get(digest)
        if entry is None:
            return None
        stored_at, answer = entry
        if self._clock() - stored_at >= self._ttl_s:
            del self._entries[digest]
            CACHE_ENTRIES.set(len(self._entries))
            return None
        self._entries.move_to_end(digest)
        return answer

    def put(self, key: CacheKey, answer: CachedAnswer) -> None:
        if not self.enabled:
            return
        digest = key.digest()
        self._entries[digest] = (self._clock(), answer)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        CACHE_ENTRIES.set(len(self._entries))


@dataclass(frozen=True)
class SemanticHit:
    answer: CachedAnswer
    similarity: float


class SemanticCache:
    """Answers kept by the meaning of their question, for a policy that opts in: a new question whose
    MiniLM embedding is at least `threshold` cosine-similar to a stored one, with everything else equal
    (`context`: the principal, endpoint, served version, prompt version, sampling parameters and the
    whole model input but the question itself), gets the stored answer.

    At most `capacity` answers over all contexts and PER_CONTEXT in one (the oldest goes first), each
    served for `ttl_s`; the least recently used context goes first when the cache is full. A lookup
    compares the question with every answer of its context: PER_CONTEXT bounds that to one matrix product.
    """

    PER_CONTEXT = 256

    def __init__(self, *, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self._ttl_s = ttl_s
        self._clock = clock
        self._contexts: OrderedDict[bytes, list[tuple[float, Any, CachedAnswer]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def get(self, context: CacheKey, question: Any, threshold: float) -> SemanticHit | None:
        """The most similar fresh answer of `context` at or above `threshold`, the policy's (`question`: a
        unit vector)."""
        digest = context.digest()
        entries = self._contexts.get(digest)
        if not entries:
            return None
        fresh = [entry for entry in entries if self._clock() - entry[0] < self._ttl_s]
        self._size -= len(entries) - len(fresh)
        if not fresh:
            del self._contexts[digest]
            return None
        self._contexts[digest] = fresh
        self._contexts.move_to_end(digest)
        similarities = np.stack([vector for _, vector, _ in fresh]) @ question
        best = int(np.argmax(similarities))
        if float(similarities[best]) < threshold:
            return None
        return SemanticHit(fresh[best][2], float(similarities[best]))

    def put(self, context: CacheKey, question: Any, answer: CachedAnswer) -> None:
        digest = context.digest()
        entries = self._contexts.setdefault(digest, [])
        entries.append((self._clock(), question, answer))
        self._size += 1
        if len(entries) > self.PER_CONTEXT:
            entries.pop(0)
            self._size -= 1
        self._contexts.move_to_end(digest)
        while self._size > self.capacity and self._contexts:
            _, dropped = self._contexts.popitem(last=False)
            self._size -= len(dropped)
