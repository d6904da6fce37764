"""A trace's spans as a tree, depth first: what the trace pages, `flywheel ops trace`, the trace judge and the
review queues' trace items all show, so they place every span the same way."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Placed:
    """A span where the tree puts it: its depth, and whether it names a parent that is not stored (yet)."""

    span: dict[str, Any]
    depth: int
    parent_missing: bool


def tree_order(spans: list[dict[str, Any]]) -> list[Placed]:
    """Each span once, depth first: roots by start, children under their parent by start. A span whose
    parent is not stored (yet) starts a branch of its own, and a cycle of parents (nothing guards what an
    app sends) is placed once, never followed round. `spans` come ordered by start."""
    stored = {span["span_id"] for span in spans}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        children[span["parent_span_id"] if span["parent_span_id"] in stored else None].append(span)
    placed: list[Placed] = []
    seen: set[str] = set()

    def branch(top: dict[str, Any]) -> None:
        # A stack, not recursion: a chain of thousands of spans is as deep as Python allows calls.
        pending = [(top, 0)]
        while pending:
            span, depth = pending.pop()
            if span["span_id"] in seen:
                continue
            seen.add(span["span_id"])
            parent = span["parent_span_id"]
            placed.append(Placed(span, depth, parent is not None and parent not in stored))
            pending.extend((child, depth + 1) for child in reversed(children[span["span_id"]]))

    for root in children[None]:
        branch(root)
    for span in spans:
        branch(span)
    return placed
