"""Format validity: is the answer a JSON document that satisfies the task's JSON Schema?

Models often wrap JSON in a Markdown fence (```json ... ```); one surrounding fence is accepted,
since clients strip it too. Anything else around the document makes it invalid. A schema that is
itself invalid raises (the golden set is wrong, not the answer).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

_FENCE = re.compile(r"^```(?:json)?\s*\n?(?P<body>.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class FormatCheck:
    valid: bool
    problem: str | None = None
    # Where a schema failed and which keyword failed: a problem said without the answer's values in it.
    path: str | None = None
    keyword: str | None = None

    @property
    def score(self) -> float:
        return float(self.valid)


def json_validity(answer: str, schema: dict[str, Any] | None = None) -> FormatCheck:
    # Checked before the answer: a broken schema is an error of the record, whatever the answer.
    validator_class = None if schema is None else checked_validator(json.dumps(schema, sort_keys=True))
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced["body"].strip()
    try:
        document = json.loads(text)
    except ValueError as error:
        return FormatCheck(False, f"not JSON: {error}")
    if validator_class is None:
        return FormatCheck(True)
    problems = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    if problems:
        where = "/".join(str(part) for part in problems[0].absolute_path) or "(root)"
        return FormatCheck(False, f"{where}: {problems[0].message}", where, str(problems[0].validator))
    return FormatCheck(True)


@functools.lru_cache(maxsize=256)
def checked_validator(schema_json: str) -> Any:
    """The validator class for a schema (as canonical JSON), once the schema is checked against its
    metaschema; SchemaError when it is invalid. Remembered: checking takes about 0.4 ms, and the gateway
    checks every answer of a structured route against the same few schemas."""
    import jsonschema

    schema = json.loads(schema_json)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class
