"""One constrained type per kind of id and name that reaches Flywheel from outside, defined once.

Ids and names become file names (a training job's work directory, a cached artifact), SQL values,
Kafka keys and URL path segments. So none may be empty, start with `.` or `-` (`..`, `-rf`), or hold a
separator (`/`, `\\`), a NUL, whitespace or anything else a shell, a path or a URL treats specially;
and each is short enough to be one file name (255 bytes) with a prefix and suffix added. A request
that breaks one gets 422; an event that breaks one is dead-lettered. Paths are still checked where
they are built (services/runtime/paths.py): the type is the first line of defence, not the only one.

Each alias is an `Annotated[str, StringConstraints(...)]`: pydantic checks it in models, FastAPI in
path parameters, and the JSON Schemas publish its `pattern` and `maxLength`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints

# The registry's name rule, unchanged since it was first published (contracts/schemas keep this exact
# text): a letter or digit first, then letters, digits, `.`, `_`, `-`; 200 characters at most.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
NAME_MAX_LENGTH = 200

# Ids that services or callers generate (uuid4, `job-42`, `auto-<model name>-v<version>`): the
# same alphabet, longer, because an evaluation id can embed a whole model name; 230 keeps
# `evaluation-<id>.html` within one file name.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ID_MAX_LENGTH = 230

# Inference ids are chosen by apps that log their own calls, and the feedback door has always
# taken `:` and `/` in them (`app:req/42`). They are only ever a Kafka key and a ClickHouse value,
# never part of a path, so that alphabet is kept.
INFERENCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
INFERENCE_ID_MAX_LENGTH = 128

SHA256_PATTERN = r"^[0-9a-f]{64}$"

# Versions are stored as signed 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT): a larger one is
# refused here with a 422, not by the database with a 500.
LARGEST_VERSION = 2**63 - 1

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)]
"""A registered name: letters, digits, `.`, `_`, `-`, starting with a letter or digit; at most 200."""

ModelName = Name
"""A base model's registered name, e.g. `smollm2-135m-instruct`."""

DatasetName = Name
"""A dataset's name; each upload is its next version."""

PromptName = Name
"""A prompt template's name."""

PromptLabel = Name
"""A label pointing at a prompt version, e.g. `production`."""

GuardPolicyName = Name
"""A guard policy's name; each publication is its next version."""

MetricSuiteName = Name
"""A named metric suite of the evaluator, e.g. `default`."""

RuleName = Name
"""A monitor alert rule's name."""

RubricName = Name
"""A review rubric's name; each publication is its next version."""

ReviewQueueName = Name
"""A review queue's name."""

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN, max_length=ID_MAX_LENGTH)]
"""A generated or caller-chosen id: letters, digits, `.`, `_`, `-`, starting with a letter or digit; at most 230."""

JobId = Identifier
"""A training job's id (its idempotency key), e.g. a uuid4 or `job-42`; names the job's work directory."""

EvaluationId = Identifier
"""An evaluation's id, e.g. `ev-3f2a...` or `auto-<model>-v<version>`; names its report file."""

DeploymentId = Identifier
"""A deployment request's id."""

AlertId = Identifier
"""An alert's id (a uuid4)."""

FeedbackId = Identifier
"""A piece of feedback's id (a uuid4 unless the sender chose one)."""

InferenceId = Annotated[str, StringConstraints(pattern=INFERENCE_ID_PATTERN, max_length=INFERENCE_ID_MAX_LENGTH)]
"""An inference's id (the gateway's response id, or an app's own): letters, digits, `.`, `_`, `:`, `/`, `-`,
starting with a letter or digit; at most 128. Never part of a path."""

Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
"""A sha256 digest in lowercase hex; artifacts are stored and cached under it."""

VersionNumber = Annotated[int, Field(ge=1, le=LARGEST_VERSION)]
"""A version of a registered thing (prompt, adapter, dataset), counted from 1."""

ID_PATTERNS: tuple[str, ...] = (NAME_PATTERN, ID_PATTERN, INFERENCE_ID_PATTERN, SHA256_PATTERN)
"""Every pattern above; the schema snapshot check recognises a field that gained one as a deliberate tightening."""


TRACE_ID_PATTERN = r"^[0-9a-f]{32}$"
SPAN_ID_PATTERN = r"^[0-9a-f]{16}$"


def _not_all_zero(value: str) -> str:
    # The pattern alone cannot say it: pydantic's regex engine has no lookahead.
    if not value.strip("0"):
        raise ValueError("an all-zero trace or span id is invalid (W3C trace context)")
    return value


TraceId = Annotated[str, StringConstraints(pattern=TRACE_ID_PATTERN), AfterValidator(_not_all_zero)]
"""A W3C / OpenTelemetry trace id: 32 lowercase hex digits (16 bytes), not all zero."""

SpanId = Annotated[str, StringConstraints(pattern=SPAN_ID_PATTERN), AfterValidator(_not_all_zero)]
"""A W3C / OpenTelemetry span id: 16 lowercase hex digits (8 bytes), not all zero."""

SessionId = Annotated[
    str,
    StringConstraints(pattern=INFERENCE_ID_PATTERN, max_length=INFERENCE_ID_MAX_LENGTH),
    # A mark of its own, which validation and schemas ignore: without one this alias would be InferenceId
    # itself (typing caches equal Annotated forms as one object), and the reference pages, which name an
    # alias by its object, would call it InferenceId.
    "SessionId",
]
"""A conversation's id chosen by the app (OpenInference `session.id`, GenAI `gen_ai.conversation.id`):
the characters of an inference id; at most 128. Never part of a path."""
