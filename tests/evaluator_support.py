"""Evaluator test helpers: a tiny random Llama with SmolLM2's real tokenizer stored as a base model,
golden sets from the trainer's demo data, and an Evaluator wired to a test's own home."""

from __future__ import annotations

import json
from pathlib import Path

from services.evaluator.service import Evaluator
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.store import DatasetPointer, EvaluatorStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.scoring import Embedder
from tests.serving_support import make_adapter, smollm2_tokenizer, tiny_model

GOLDEN = Path(__file__).resolve().parents[1] / "services" / "demo" / "data" / "golden.jsonl"
MODEL = "tiny-smol"


def tiny_base_dir(root: Path) -> Path:
    """A random 2-layer Llama saved with the SmolLM2 tokenizer, as the registry stores a base model."""
    directory = root / "tiny-base"
    if not (directory / "config.json").exists():
        tokenizer = smollm2_tokenizer(root / "tokenizer")
        tiny_model(len(tokenizer)).save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
    return directory


def golden_lines(count: int) -> list[str]:
    return GOLDEN.read_text().splitlines()[:count]


def evaluator_for(home: Path, clickhouse, embedder: Embedder, **settings: object) -> Evaluator:  # noqa: ANN001
    options = {"max_tokens": 6, "batch_size": 4, "resamples": 200, **settings}
    return Evaluator(
        store=EvaluatorStore(home / "evaluator" / "evaluator.db"),
        artifacts=ArtifactStore(home / "artifacts"),
        clickhouse=lambda: clickhouse,
        settings=EvaluatorSettings(**options),
        home=home,
        cache=home / "cache",
        embedder=embedder,
    )


def register(
    evaluator: Evaluator,
    base_dir: Path,
    *,
    adapters: dict[int, Path] | None = None,
    golden: dict[int, str] | None = None,
) -> None:
    """Put models and datasets in the artifact store and tell the evaluator, as the registry's events would."""
    artifacts, store = evaluator.artifacts, evaluator.store
    base = artifacts.put_directory(base_dir)
    store.remember_model(MODEL, base.uri, base.sha256)
    for version, directory in (adapters or {}).items():
        ref = artifacts.put_directory(directory)
        store.remember_adapter(MODEL, version, ref.uri, ref.sha256)
    for version, jsonl in (golden or {}).items():
        ref = artifacts.put_bytes(jsonl.encode(), kind="jsonl")
        store.remember_dataset(DatasetPointer("acme-golden", version, "golden", ref.uri, ref.sha256, MODEL))


def random_adapter(root: Path, seed: int) -> Path:
    tokenizer = smollm2_tokenizer(root / "tokenizer")
    return make_adapter(len(tokenizer), root / f"adapter-{seed}", seed)


def with_schema(line: str, schema: object) -> str:
    record = json.loads(line)
    record["schema"] = schema
    return json.dumps(record)
