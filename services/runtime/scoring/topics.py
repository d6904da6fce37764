"""Denied topics: does a text ask about a subject a deployment will not discuss (medical advice, a
competitor, legal counsel)?

Method: each topic is declared by a few example requests; a text is on a topic when its all-MiniLM-L6-v2
embedding has a cosine similarity of at least `threshold` to one of the topic's examples. Examples, not a
description: a request is closer in meaning to another request than to a sentence about requests.
MiniLM reads the first 256 tokens of a text.

Known limits: English, meaning only (a question phrased far from every example is missed, so give
examples of the ways users ask), and a short off-topic text that shares the examples' words can come
close; the threshold trades one against the other, and the gateway's span carries the similarity so a
deployment can set it on its own traffic.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from services.runtime.scoring.grounding import Embedder


class TopicMatcher:
    """The declared topics' example embeddings, computed once, matched against texts."""

    def __init__(self, topics: Mapping[str, Sequence[str]], threshold: float, embedder: Embedder) -> None:
        self.topics = {name: list(examples) for name, examples in topics.items() if examples}
        self.threshold = threshold
        self._embedder = embedder
        self._lock = threading.Lock()
        self._examples: Any = None  # (examples, 384) unit vectors, once embedded
        self._owners: list[str] = []  # the topic of each example row

    def warm(self) -> None:
        self._vectors()

    def matches(self, texts: Sequence[str]) -> dict[str, float]:
        """The topics some text is on, each with the highest similarity found (at least the threshold);
        and, under the key "", the highest similarity of any text to any example."""
        examples = self._vectors()
        if not texts or examples is None:
            return {"": 0.0}
        similarities = self._embedder.encode(list(texts)) @ examples.T
        best: dict[str, float] = {"": float(similarities.max())}
        for column, name in enumerate(self._owners):
            top = float(similarities[:, column].max())
            if top >= self.threshold:
                best[name] = max(best.get(name, 0.0), top)
        return best

    def _vectors(self) -> Any:
        with self._lock:
            if self._examples is None and self.topics:
                self._owners = [name for name, examples in self.topics.items() for _ in examples]
                self._examples = self._embedder.encode([text for examples in self.topics.values() for text in examples])
            return self._examples
