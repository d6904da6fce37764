"""What the demo runs: the base model, the Acme Nimbus data beside this module (data/), the reduced
training recipe, the gate policy and the alert rule; and how the demo reads its data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
# Written by data/generate.py; the trainer's `flywheel train local` and `bench train` default to it too.
DATA = Path(__file__).resolve().parent / "data"
# The reduced training recipe of the trainer's learning test: 8 facts x 8 paraphrases, 2 epochs at a
# high learning rate. It is what fits the 20-minute budget on 2 CPU cores and still passes facts@v1.
FACTS_V1 = 8
FACTS_TRAFFIC = 16
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GATE_POLICY = "facts@v1"
MIN_CORRECTIONS = 8
CORRECTION_REPEATS = 2
# The demo's alert rule: a thumbs-down rate over 30% in the last 15 minutes (10 ratings at least)
# opens a quality alert; the monitor's default rules compare against a day-long baseline a fresh demo has not got.
RULES = """rules:
  - name: demo-thumbs-down-rate
    version: 1
    metric: thumbs_down_rate
    threshold: 0.3
    severity: warning
    window_s: 900
    min_samples: 10
    cooldown_s: 3600
  - name: error-rate
    version: 1
    metric: error_rate
    threshold: 0.05
    severity: critical
    window_s: 900
    min_samples: 10
    cooldown_s: 1800
"""


def records(name: str) -> list[dict[str, Any]]:
    """The records of one of the demo's JSONL files (train.jsonl, golden.jsonl)."""
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def reference_of(row: dict[str, Any]) -> str:
    """The reference answer of a chat record: its last message."""
    return row["messages"][-1]["content"]


def numbers_in(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)?", text))


def as_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
