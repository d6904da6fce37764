"""Review queues' state in SQLite under FLYWHEEL_HOME/feedback: the only module that opens review.db.

A queue's definitions (each version, with the rubric as the registry published it), its items (which
inference, trace or session, under which queue version, at which stage), the reviewers' leases on them, their reviews and
their skips. What an item shows (the prompt and the answer) stays in ClickHouse, redacted as the sink
stored it; this file holds ids, scores and who did what.

A claim is one transaction (BEGIN IMMEDIATE): two reviewers asking at once never get the same place on
an item, and a lease that lapsed is free again without anyone releasing it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from contracts.http import ReviewOrder
from services.runtime.sqlite import Migration, SqliteDatabase

MIGRATIONS = (
    Migration(
        1,
        "review_queues",
        """
CREATE TABLE queue_version (name TEXT NOT NULL, version INTEGER NOT NULL, definition TEXT NOT NULL, rubric TEXT NOT NULL,
    created_by TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE item (item_id TEXT PRIMARY KEY, queue TEXT NOT NULL, queue_version INTEGER NOT NULL, inference_id TEXT NOT NULL,
    prompt_key TEXT NOT NULL, groundedness REAL, occurred_at TEXT NOT NULL, added_at TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT 'review', UNIQUE (queue, inference_id));
CREATE INDEX item_by_queue_stage ON item (queue, stage);
CREATE INDEX item_by_prompt ON item (queue, prompt_key);
CREATE TABLE lease (item_id TEXT NOT NULL, reviewer TEXT NOT NULL, stage TEXT NOT NULL, expires_at TEXT NOT NULL,
    PRIMARY KEY (item_id, reviewer, stage));
CREATE TABLE review (item_id TEXT NOT NULL, reviewer TEXT NOT NULL, stage TEXT NOT NULL, scores TEXT NOT NULL,
    correction TEXT, comment TEXT, feedback_id TEXT NOT NULL, reviewed_at TEXT NOT NULL, PRIMARY KEY (item_id, reviewer, stage));
CREATE TABLE skip (item_id TEXT NOT NULL, reviewer TEXT NOT NULL, stage TEXT NOT NULL, reason TEXT NOT NULL, skipped_at TEXT NOT NULL,
    PRIMARY KEY (item_id, reviewer, stage));
CREATE TABLE fill (queue TEXT PRIMARY KEY, filled_at TEXT NOT NULL);
""",
    ),
    # A pairwise item (a `pairs` rule) shows two answers to one prompt: inference_id first, second_inference_id
    # beside it; its reviews record a choice (first, second or tie) instead of scores.
    Migration(
        2,
        "pairwise_items",
        """
ALTER TABLE item ADD COLUMN second_inference_id TEXT;
ALTER TABLE review ADD COLUMN choice TEXT;
""",
    ),
    # A trace or session item (a rule whose target is trace or session) reviews a whole trace or session. The
    # item's inference_id column keeps its name and holds the trace or session id: UNIQUE (queue, inference_id)
    # then queues each trace or session once per queue, as it does an inference.
    Migration(
        3,
        "trace_and_session_items",
        """
ALTER TABLE item ADD COLUMN target TEXT NOT NULL DEFAULT 'inference';
""",
    ),
    # The model's own confidence in an answer (its mean token log-probability), for queues ordered least_confident.
    Migration(4, "item_confidence", "ALTER TABLE item ADD COLUMN confidence REAL;"),
)

REVIEW, ADJUDICATION, DONE = "review", "adjudication", "done"
# Unscored items (no groundedness, no logged confidence) come after the scored ones, newest first among equals.
_CLAIM_ORDER = {
    ReviewOrder.uncertainty: "i.groundedness IS NULL, i.groundedness ASC, i.occurred_at DESC",
    ReviewOrder.least_confident: "i.confidence IS NULL, i.confidence ASC, i.occurred_at DESC",
    ReviewOrder.newest: "i.occurred_at DESC",
}
# An item whose inference is no longer stored (a TTL or a deletion in ClickHouse): never offered again.
GONE = "gone"


@dataclass(frozen=True)
class QueueRecord:
    name: str
    version: int
    definition: dict[str, Any]  # ReviewQueueCreate's fields but the name
    rubric: dict[str, Any]  # RubricVersionView as the registry answered
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class Candidate:
    """An answered inference a fill may add, or two answers to one prompt shown side by side."""

    inference_id: str
    prompt_key: str
    occurred_at: datetime
    groundedness: float | None
    second_inference_id: str | None = None
    target: str = "inference"  # ReviewTarget: for a trace or session, inference_id is its id
    confidence: float | None = None  # the answer's mean token log-probability


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    queue: str
    queue_version: int
    inference_id: str  # the trace's or session's id on a trace or session item
    groundedness: float | None
    stage: str
    second_inference_id: str | None
    target: str = "inference"
    confidence: float | None = None


@dataclass(frozen=True)
class ReviewRecord:
    reviewer: str
    stage: str
    scores: dict[str, str]
    correction: str | None
    comment: str | None
    feedback_id: str
    choice: str | None = None


class ReviewStore:
    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------------------------- queues

    def define(self, name: str, definition: dict[str, Any], rubric: dict[str, Any], created_by: str) -> QueueRecord:
        """The queue's next version."""
        now = _now()
        with self._db.transaction() as db:
            (latest,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM queue_version WHERE name = ?", (name,)
            ).fetchone()
            db.execute(
                "INSERT INTO queue_version VALUES (?, ?, ?, ?, ?, ?)",
                (
                    name,
                    latest + 1,
                    json.dumps(definition),
                    json.dumps(rubric, default=str),
                    created_by,
                    now.isoformat(),
                ),
            )
        return QueueRecord(name, latest + 1, definition, rubric, created_by, now)

    def queue(self, name: str) -> QueueRecord | None:
        row = self._db.row(
            "SELECT name, version, definition, rubric, created_by, created_at FROM queue_version WHERE name = ? "
            "ORDER BY version DESC LIMIT 1",
            (name,),
        )
        return _queue(row) if row else None

    def queue_version(self, name: str, version: int) -> QueueRecord | None:
        row = self._db.row(
            "SELECT name, version, definition, rubric, created_by, created_at FROM queue_version WHERE name = ? AND version = ?",
            (name, version),
        )
        return _queue(row) if row else None

    def queues(self) -> list[QueueRecord]:
        rows = self._db.rows(
            "SELECT q.name, q.version, q.definition, q.rubric, q.created_by, q.created_at FROM queue_version q "
            "WHERE q.version = (SELECT MAX(version) FROM queue_version WHERE name = q.name) ORDER BY q.name"
        )
        return [_queue(row) for row in rows]

    def counts(self, name: str) -> dict[str, int]:
        now = _now().isoformat()
        counts = dict(self._db.rows("SELECT stage, COUNT(*) FROM item WHERE queue = ? GROUP BY stage", (name,)))
        (claimed,) = self._db.row(
            "SELECT COUNT(DISTINCT l.item_id) FROM lease l JOIN item i ON i.item_id = l.item_id "
            "WHERE i.queue = ? AND l.expires_at > ? AND l.stage = i.stage",
            (name, now),
        ) or (0,)
        (skips,) = self._db.row(
            "SELECT COUNT(*) FROM skip s JOIN item i ON i.item_id = s.item_id WHERE i.queue = ?", (name,)
        ) or (0,)
        return {
            "open": counts.get(REVIEW, 0),
            "claimed": claimed,
            "adjudication": counts.get(ADJUDICATION, 0),
            "done": counts.get(DONE, 0),
            "gone": counts.get(GONE, 0),
            "skips": skips,
        }

    # -------------------------------------------------------------------------------------- fills

    def last_fill(self, name: str) -> datetime | None:
        row = self._db.row("SELECT filled_at FROM fill WHERE queue = ?", (name,))
        return datetime.fromisoformat(row[0]) if row else None

    def add(self, queue: QueueRecord, candidates: list[Candidate], limit: int) -> tuple[int, int, int]:
        """Add candidates in order, up to `limit`: those not queued yet, one per prompt. Returns (added,
        already queued, left out as a duplicate prompt)."""
        added = already = duplicates = 0
        now = _now().isoformat()
        with self._db.transaction() as db:
            queued = {
                inference_id
                for row in db.execute(
                    "SELECT inference_id, second_inference_id FROM item WHERE queue = ?", (queue.name,)
                )
                for inference_id in row
                if inference_id is not None
            }
            prompts = {row[0] for row in db.execute("SELECT prompt_key FROM item WHERE queue = ?", (queue.name,))}
            for candidate in candidates:
                if candidate.inference_id in queued or candidate.second_inference_id in queued:
                    already += 1
                    continue
                if candidate.prompt_key in prompts:
                    duplicates += 1
                    continue
                if added >= limit:
                    continue
                db.execute(
                    "INSERT INTO item (item_id, queue, queue_version, inference_id, prompt_key, groundedness, occurred_at, "
                    "added_at, second_inference_id, target, confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        uuid.uuid4().hex,
                        queue.name,
                        queue.version,
                        candidate.inference_id,
                        candidate.prompt_key,
                        candidate.groundedness,
                        candidate.occurred_at.isoformat(),
                        now,
                        candidate.second_inference_id,
                        candidate.target,
                        candidate.confidence,
                    ),
                )
                queued.update(filter(None, (candidate.inference_id, candidate.second_inference_id)))
                prompts.add(candidate.prompt_key)
                added += 1
            db.execute(
                "INSERT INTO fill (queue, filled_at) VALUES (?, ?) ON CONFLICT (queue) DO UPDATE SET filled_at = excluded.filled_at",
                (queue.name, now),
            )
        return added, already, duplicates

    # ------------------------------------------------------------------------------------- claims

    def claim(self, queue: QueueRecord, reviewer: str, *, order: ReviewOrder) -> tuple[ItemRecord, datetime] | None:
        """Lease the first item this reviewer may work on, or None when there is none: an item at review
        that needs more reviewers than it has (reviews plus live leases of others) and that this reviewer
        has not reviewed, skipped or claimed; else an item at adjudication no one holds and whose reviews
        are not this reviewer's. A reviewer's own live lease is handed back to them (a reload of the page)."""
        now = _now()
        expires = now + timedelta(seconds=int(queue.definition["lease_seconds"]))
        needed = int(queue.definition["reviewers_per_item"])
        with self._db.transaction() as db:
            held = db.execute(
                "SELECT i.item_id, i.stage FROM lease l JOIN item i ON i.item_id = l.item_id "
                "WHERE i.queue = ? AND l.reviewer = ? AND l.stage = i.stage AND l.expires_at > ? LIMIT 1",
                (queue.name, reviewer, now.isoformat()),
            ).fetchone()
            if held:
                item_id, stage = held
            else:
                found = db.execute(
                    "SELECT i.item_id, i.stage FROM item i WHERE i.queue = ? AND ("
                    " (i.stage = 'review'"
                    "  AND (SELECT COUNT(*) FROM review r WHERE r.item_id = i.item_id AND r.stage = 'review')"
                    "    + (SELECT COUNT(*) FROM lease l WHERE l.item_id = i.item_id AND l.stage = 'review' AND l.expires_at > ?) < ?"
                    "  AND NOT EXISTS (SELECT 1 FROM review r WHERE r.item_id = i.item_id AND r.reviewer = ?)"
                    "  AND NOT EXISTS (SELECT 1 FROM lease l WHERE l.item_id = i.item_id AND l.reviewer = ? AND l.stage = 'review'))"
                    " OR (i.stage = 'adjudication'"
                    "  AND NOT EXISTS (SELECT 1 FROM lease l WHERE l.item_id = i.item_id AND l.stage = 'adjudication' AND l.expires_at > ?)"
                    "  AND NOT EXISTS (SELECT 1 FROM review r WHERE r.item_id = i.item_id AND r.reviewer = ?)))"
                    " AND NOT EXISTS (SELECT 1 FROM skip s WHERE s.item_id = i.item_id AND s.reviewer = ? AND s.stage = i.stage)"
                    # Adjudication first: a conflict holds its item back from being done.
                    f" ORDER BY i.stage = 'adjudication' DESC, {_CLAIM_ORDER[order]} LIMIT 1",
                    (queue.name, now.isoformat(), needed, reviewer, reviewer, now.isoformat(), reviewer, reviewer),
                ).fetchone()
                if found is None:
                    return None
                item_id, stage = found
            db.execute(
                "INSERT INTO lease (item_id, reviewer, stage, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (item_id, reviewer, stage) DO UPDATE SET expires_at = excluded.expires_at",
                (item_id, reviewer, stage, expires.isoformat()),
            )
        item = self.item(item_id)
        assert item is not None
        return item, expires

    def item(self, item_id: str) -> ItemRecord | None:
        row = self._db.row(
            "SELECT item_id, queue, queue_version, inference_id, groundedness, stage, second_inference_id, target, "
            "confidence "
            "FROM item WHERE item_id = ?",
            (item_id,),
        )
        return ItemRecord(*row) if row else None

    def lease_expires_at(self, item_id: str, reviewer: str, stage: str) -> datetime | None:
        """When `reviewer`'s live lease on the item at `stage` lapses; None when they hold none."""
        row = self._db.row(
            "SELECT expires_at FROM lease WHERE item_id = ? AND reviewer = ? AND stage = ? AND expires_at > ?",
            (item_id, reviewer, stage, _now().isoformat()),
        )
        return datetime.fromisoformat(row[0]) if row else None

    def reviews(self, item_id: str) -> list[ReviewRecord]:
        rows = self._db.rows(
            "SELECT reviewer, stage, scores, correction, comment, feedback_id, choice FROM review WHERE item_id = ? ORDER BY reviewed_at",
            (item_id,),
        )
        return [_review(row) for row in rows]

    def review(
        self, item: ItemRecord, record: ReviewRecord, decide: Callable[[list[ReviewRecord]], str | None]
    ) -> str | None:
        """Record a review and end its lease; `decide` sees every review of the item at this stage, this one
        included, and names the stage the item moves to (None: it waits for more). One transaction: two
        reviewers finishing an item at once cannot both see the other missing and leave it waiting forever."""
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO review (item_id, reviewer, stage, scores, correction, comment, feedback_id, reviewed_at, choice) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (item_id, reviewer, stage) DO NOTHING",
                (
                    item.item_id,
                    record.reviewer,
                    record.stage,
                    json.dumps(record.scores),
                    record.correction,
                    record.comment,
                    record.feedback_id,
                    _now().isoformat(),
                    record.choice,
                ),
            )
            db.execute(
                "DELETE FROM lease WHERE item_id = ? AND reviewer = ? AND stage = ?",
                (item.item_id, record.reviewer, record.stage),
            )
            rows = db.execute(
                "SELECT reviewer, stage, scores, correction, comment, feedback_id, choice FROM review "
                "WHERE item_id = ? AND stage = ? ORDER BY reviewed_at",
                (item.item_id, record.stage),
            ).fetchall()
            next_stage = decide([_review(row) for row in rows])
            if next_stage is not None:
                db.execute("UPDATE item SET stage = ? WHERE item_id = ?", (next_stage, item.item_id))
        return next_stage

    def skip(self, item: ItemRecord, reviewer: str, reason: str) -> None:
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO skip VALUES (?, ?, ?, ?, ?) ON CONFLICT (item_id, reviewer, stage) DO UPDATE SET reason = excluded.reason",
                (item.item_id, reviewer, item.stage, reason, _now().isoformat()),
            )
            db.execute(
                "DELETE FROM lease WHERE item_id = ? AND reviewer = ? AND stage = ?",
                (item.item_id, reviewer, item.stage),
            )

    def retire(self, item: ItemRecord) -> None:
        """Take an item whose inference is gone out of the queue, with every lease on it; its reviews stay."""
        with self._db.transaction() as db:
            db.execute("UPDATE item SET stage = ? WHERE item_id = ?", (GONE, item.item_id))
            db.execute("DELETE FROM lease WHERE item_id = ?", (item.item_id,))

    def reviewed_items(self, name: str) -> list[tuple[str, str, dict[str, str], str | None]]:
        """(item id, reviewer, scores, choice) of every review at the review stage of the queue's items."""
        rows = self._db.rows(
            "SELECT r.item_id, r.reviewer, r.scores, r.choice FROM review r JOIN item i ON i.item_id = r.item_id "
            "WHERE i.queue = ? AND r.stage = 'review' ORDER BY r.reviewed_at",
            (name,),
        )
        return [(row[0], row[1], json.loads(row[2]), row[3]) for row in rows]


def _queue(row: tuple[Any, ...]) -> QueueRecord:
    return QueueRecord(row[0], row[1], json.loads(row[2]), json.loads(row[3]), row[4], datetime.fromisoformat(row[5]))


def _review(row: tuple[Any, ...]) -> ReviewRecord:
    return ReviewRecord(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5], row[6])


def _now() -> datetime:
    return datetime.now(UTC)
