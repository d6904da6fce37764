"""The gateway's use cases: resolve the model, render and check the prompt, call Triton, log the inference.

Imports neither FastAPI nor Kafka: api.py translates HTTP to these calls, and the inference log
buffer publishes (scrubbed of personal data and secrets first). Every request that gets this far
ends in exactly one `inference.logged`, ok or error; an authenticated caller's request refused before
(bad body, rate limit) is logged by `refused`; a request without a valid key is never logged.

Each call is a span of a trace (trace_context.py): of the caller's, when it sent a valid `traceparent`,
else of a new one. Its inference.logged names the trace, the call's server span and the session; the
server span and its Triton, queue and compute spans (spans.py) travel with that inference through
the log buffer, so they are published, scrubbed, kept or dropped together.

A deterministic request (greedy or seeded) asked again by the same caller of the same version is
answered from the response cache (response_cache.py) without Triton: its inference.logged has route
`cache` and the version that produced the answer, so feedback on it counts against that version.

With the guards on (guard.py), secrets and personal data are flagged, redacted or blocked in the model
input before it reaches Triton, and in the answer before any of it leaves, streamed or not; each verdict
is a guardrail span of the call and travels on its inference.logged.

A streamed request (`Stream`) is checked and sent to Triton, and its first piece awaited, before
any byte of the response goes out, so every refusal and a Triton outage are still HTTP errors;
after that, pieces are relayed as the batcher decodes them. A client that leaves mid-stream gets
its request cancelled on Triton (the cancel model), which frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts.events import GuardAction, InferenceLogged, InferenceStatus
from contracts.http import ChatCompletionRequest, CompletionRequest
from services.runtime import errors
from services.runtime.prompts import MissingVariable, PromptError, lead_with_prompt, render_template
from services.runtime.scoring.grounding import Embedder
from services.runtime.scoring.injection import WINDOW_TOKENS, InjectionDetector
from services.serving.guard import (
    ContentBlocked,
    GuardedText,
    GuardPolicy,
    GuardVerdict,
    SchemaRefused,
    answer_structure,
)
from services.serving.guard_policies import GuardPolicies
from services.serving.inference_log import InferenceLogBuffer
from services.serving.prompt_routes import PromptChoice, PromptRoutes, UnknownPromptError
from services.serving.response_cache import (
    CACHE_LOOKUPS,
    CacheKey,
    CachedAnswer,
    CacheUse,
    ResponseCache,
    SemanticCache,
    cacheable,
)
from services.serving.routes import Route, Routes, UnknownModelError
from services.serving.settings import ServingSettings
from services.serving.spans import TritonCall, call_spans
from services.serving.trace_context import CallTrace
from services.serving.triton import (
    CANCEL_MODEL_NAME,
    STREAM_MODEL_NAME,
    TritonAnswer,
    TritonRow,
    infer_inputs,
    infer_outputs,
    parse_answer,
)

log = logging.getLogger("flywheel.serving.gateway")

DISCONNECTED = "the client disconnected before the stream ended"
# Stands for the question in the model input the semantic cache keys on. A request that writes it itself
# only meets entries of its own principal (the key holds it).
QUESTION_MARK = "\x00question\x00"
# How long a stream whose answer has come may take to end on Triton's side before it is cancelled.
STREAM_RELEASE_WITHIN_S = 5.0
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; each one is checked against the text after every token


class GatewayError(errors.DomainError):
    """A request the gateway refuses or cannot serve, with OpenAI's code and param; its kind says which."""


class NotServed(GatewayError, errors.NotFound):
    """The model, version or prompt asked for is not served here."""


class RequestRefused(GatewayError, errors.BadRequest):
    """A request the gateway cannot serve as asked (a limit, an empty prompt, a prompt that does not render)."""


class InferenceUnavailable(GatewayError, errors.Unavailable):
    """Triton cannot be reached; the same request may succeed once it is back."""


class AnswerBlocked(GatewayError, errors.BadRequest):
    """The output guard blocked the answer: it held what the guard's policy blocks."""


class InputBlocked(GatewayError, errors.BadRequest):
    """The input guard refused the request: its model input held what the guard's policy blocks."""


def _blocked(blocked: ContentBlocked) -> AnswerBlocked:
    return AnswerBlocked(str(blocked), code="output_blocked")


@dataclass
class Completion:
    inference_id: str
    created: int
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cache: str  # what the response cache did: hit, miss, bypass, uncacheable or off (x-flywheel-cache)


@dataclass
class _Call:
    endpoint: str
    request: ChatCompletionRequest | CompletionRequest
    inference_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    principal: str | None = None
    route: Route | None = None
    prompt_choice: PromptChoice | None = None
    prompt: str = ""
    holds: str | None = None  # the adapter this call keeps from being unloaded until it ends
    trace: CallTrace = field(default_factory=CallTrace.start)
    triton_sent_ns: int = 0  # unix ns when the request went to Triton; 0 while it has not
    triton_ended_ns: int = 0  # unix ns of Triton's last answer, or of the failure
    cache_use: CacheUse = CacheUse.normal
    cache_key: CacheKey | None = None  # set when the answer may be stored
    cache: str = "off"
    cached_from: str | None = None  # the inference whose answer a cache hit replays
    input_guard: GuardVerdict | None = None  # what the input guard did to the model input, when it checked it
    guard: GuardVerdict | None = None  # what the output guard did to the answer, when it checked one
    screened: GuardVerdict | None = None  # the prompt-injection screen's own verdict, when it ran
    policy: GuardPolicy | None = None  # what guards this call, once its model is known
    structure: dict[str, Any] | None = None  # the JSON Schema its answer must satisfy, when the policy checks it
    context: str | None = None  # what its answer must be grounded in, when the policy checks it
    grounding_later: GuardedText | None = None  # an answer gone out whose flag-only groundedness is still to score
    question: str | None = None  # what the semantic cache compares: the last user message, or the prompt
    context_input: str | None = None  # the model input with the question marked out
    semantic_key: CacheKey | None = None
    question_vector: Any = None  # the question's MiniLM embedding, once looked up
    similarity: float | None = None  # of a semantic hit's question to the stored one

    @property
    def sticky_key(self) -> str:
        """Canary and A/B buckets follow the end user, else the calling app's key."""
        return self.request.user or self.principal or self.inference_id

    @property
    def route_label(self) -> str:
        if self.cached_from is not None:
            return "cache"
        if self.route is not None and self.route.route == "canary":
            return "canary"
        if self.prompt_choice is not None and self.prompt_choice.route == "ab":
            return "ab"
        return self.route.route if self.route else "direct"


class Gateway:
    def __init__(
        self,
        *,
        routes: Routes,
        tokenizer: Any,
        triton_grpc_url: str,
        settings: ServingSettings,
        log_buffer: InferenceLogBuffer,
        loaded_adapters: Callable[[], set[str]],
        prompts: PromptRoutes | None = None,
        guard_policies: GuardPolicies | None = None,
        triton_model: str = STREAM_MODEL_NAME,
        cache: ResponseCache | None = None,
    ) -> None:
        self.routes = routes
        self.prompts = prompts or PromptRoutes()
        self.guard_policies = guard_policies or GuardPolicies()
        self._tokenizer = tokenizer
        self._url = triton_grpc_url
        self._settings = settings
        self._log = log_buffer
        self._loaded = loaded_adapters
        self._triton_model = triton_model
        self._client: Any = None
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight: Counter[str] = Counter()
        self.cache = cache or ResponseCache(
            capacity=settings.response_cache_entries, ttl_s=settings.response_cache_ttl_s
        )
        # Any policy may opt in to it (its threshold is the policy's): it costs nothing while it holds nothing.
        self.semantic = (
            SemanticCache(capacity=settings.response_cache_entries, ttl_s=settings.response_cache_ttl_s)
            if settings.response_cache_entries > 0
            else None
        )
        # Two MiniLMs, shared by every policy and loaded on first use: the screen's (int8, one thread, beside
        # the decode) for prompt injection and denied topics, and float32 for groundedness and the semantic cache.
        self._embedder = Embedder(max_length=WINDOW_TOKENS)
        self._detector = InjectionDetector()
        self.default_policy = GuardPolicy.of(settings.guard_spec(), None, self._detector, self._embedder)
        self._policies: dict[str, GuardPolicy] = {}  # built from the registry's, by `name:vN`
        if self.default_policy.needs_meaning:
            self._warm(self.default_policy)

    def _warm(self, policy: GuardPolicy) -> None:
        """Load the MiniLMs and the injection weights the policy uses, and embed its denied topics, now: the
        first request should not wait for them."""
        if policy.input.screens:
            policy.input.warm()
        if policy.output.grounding is not GuardAction.off or policy.semantic_threshold is not None:
            self._embedder.encode(["warm up"])

    def _policy(self, call: _Call) -> GuardPolicy:
        """The registry's active guard policy for the call (its prompt's, its route's or its model's), else
        the gateway's settings."""
        assert call.route is not None
        prompt = call.request.prompt_ref
        active = self.guard_policies.active_for(
            call.route.model_name, call.route.route, prompt.name if prompt else None
        )
        if active is None:
            return self.default_policy
        label = f"{active.policy_name}:v{active.version}"
        policy = self._policies.get(label)
        if policy is None:
            policy = self._policies[label] = GuardPolicy.of(active.spec, label, self._detector, self._embedder)
            if policy.needs_meaning:
                self._in_background(asyncio.to_thread(self._warm, policy))
        return policy

    def in_flight(self, adapter_name: str) -> int:
        """Calls routed to this adapter that have not ended: an unload waits for them (see handlers.py)."""
        return self._in_flight[adapter_name]

    async def retarget(self, triton_grpc_url: str) -> None:
        """Send the next requests to a restarted Triton at another address."""
        if triton_grpc_url == self._url:
            return
        client, self._url, self._client = self._client, triton_grpc_url, None
        if client is not None:
            await client.close()

    async def close(self) -> None:
        await self.settled()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # `trace`: the call's place in its caller's trace (api.py reads it from the headers); by default a new trace.
    # `cache_use`: what the request's Cache-Control lets the response cache do.
    async def chat(
        self,
        request: ChatCompletionRequest,
        principal: str | None = None,
        trace: CallTrace | None = None,
        cache_use: CacheUse = CacheUse.normal,
    ) -> Completion:
        return await self._complete(_call("chat.completions", request, principal, trace, cache_use))

    async def completion(
        self,
        request: CompletionRequest,
        principal: str | None = None,
        trace: CallTrace | None = None,
        cache_use: CacheUse = CacheUse.normal,
    ) -> Completion:
        return await self._complete(_call("completions", request, principal, trace, cache_use))

    async def chat_stream(
        self,
        request: ChatCompletionRequest,
        principal: str | None = None,
        trace: CallTrace | None = None,
        cache_use: CacheUse = CacheUse.normal,
    ) -> Stream | ReplayedStream:
        return await self._open_stream(_call("chat.completions", request, principal, trace, cache_use))

    async def completion_stream(
        self,
        request: CompletionRequest,
        principal: str | None = None,
        trace: CallTrace | None = None,
        cache_use: CacheUse = CacheUse.normal,
    ) -> Stream | ReplayedStream:
        return await self._open_stream(_call("completions", request, principal, trace, cache_use))

    def refused(
        self, endpoint: str, body: bytes, principal: str, status: int, message: str, trace: CallTrace | None = None
    ) -> None:
        """Log an authenticated caller's request refused before it could be served (malformed body, rate
        limit) as an errored inference, with its server span. Never called for 401/403: who has no key
        writes nothing."""
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            parsed = None
        fields = parsed if isinstance(parsed, dict) else {}
        model = fields.get("model")
        user = fields.get("user")
        metadata = fields.get("metadata")
        tags = (
            metadata
            if isinstance(metadata, dict)
            and all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items())
            else {}
        )
        # The user id and metadata go to their own fields, where they are hashed or scrubbed as identities;
        # left in the body text, an id that looks like nothing in particular would be kept as sent.
        text = (
            json.dumps(
                {key: value for key, value in fields.items() if key not in ("user", "metadata")}, ensure_ascii=False
            )
            if fields
            else body.decode(errors="replace")
        )
        trace = trace or CallTrace.start()
        model_name = model if isinstance(model, str) and model else "unknown"
        event = InferenceLogged(
            inference_id=str(uuid.uuid4()),
            model_name=model_name,
            endpoint=endpoint,
            user_id=user if isinstance(user, str) else None,
            principal=principal,
            input_text=text[:8000],
            finish_reason="error",
            status=InferenceStatus.error,
            error=f"{status}: {message}",
            started_at=datetime.now(UTC),
            metadata=tags,
            trace_id=trace.trace_id,
            span_id=trace.span_id,
            session_id=trace.session_id,
        )
        spans = call_spans(event, trace, requested_model=model_name, ended_at=datetime.now(UTC))
        self._log.offer(event, spans=spans)

    async def _complete(self, call: _Call) -> Completion:
        answer: TritonAnswer | None = None
        triton_ms = 0.0
        try:
            row = self._prepare(call)
            answer = self._cached(call, row) or await self._similar(call)
            if answer is None:
                sent, call.triton_sent_ns = time.perf_counter(), time.time_ns()
                responses, answer = await self._send_screened(call, row)
                call.triton_ended_ns = time.time_ns()
                self._release_soon(responses)
                triton_ms = (time.perf_counter() - sent) * 1000
                _check_loaded(call, answer)
                if call.policy.output.enabled:  # a cached answer was guarded before it was stored
                    try:
                        text, guarded = await call.policy.output.answer(answer.text, call.structure, call.context)
                    except ContentBlocked as blocked:
                        call.guard = blocked.verdict
                        answer = dataclasses.replace(answer, text="")  # the log keeps no blocked text either
                        raise _blocked(blocked) from None
                    answer = dataclasses.replace(answer, text=text)
                    call.guard = guarded.verdict
                    if guarded.grounds_after_release:
                        call.grounding_later = guarded
        except GatewayError as error:
            self._emit(call, answer, triton_ms, error=str(error))
            raise
        finally:
            self._release(call)
        self._emit(call, answer, triton_ms)
        self._store(call, answer)
        return Completion(
            call.inference_id,
            int(time.time()),
            call.route.label,
            answer.text,
            answer.finish_reason,
            answer.prompt_tokens,
            answer.completion_tokens,
            call.cache,
        )

    async def _open_stream(self, call: _Call) -> Stream | ReplayedStream:
        try:
            row = self._prepare(call)
            cached = self._cached(call, row) or await self._similar(call)
            if cached is not None:
                self._release(call)
                return ReplayedStream(self, call, cached)
            sent, call.triton_sent_ns = time.perf_counter(), time.time_ns()
            responses, first = await self._send_screened(call, row, stream=True, request_id=call.inference_id)
        except BaseException as error:
            self._release(call)
            if isinstance(error, GatewayError):
                self._emit(call, None, 0.0, error=str(error))
            raise
        return Stream(self, call, responses, first, sent)  # it releases the adapter when it ends

    def _prepare(self, call: _Call) -> TritonRow:
        call.route = self._resolve(call.request.model, call.sticky_key)
        call.policy = policy = self._policy(call)
        if call.route.adapter_name is not None:
            call.holds = call.route.adapter_name
            self._in_flight[call.holds] += 1
        if isinstance(call.request, ChatCompletionRequest) and policy.output.json_schema is not GuardAction.off:
            try:
                call.structure = answer_structure(call.request.response_format)
            except SchemaRefused as refused:
                raise RequestRefused(str(refused), code="invalid_value", param="response_format") from None
        if policy.output.grounding is not GuardAction.off:
            call.context = call.request.grounding_context
        call.prompt = self._render(call)
        if policy.input.reads_values:
            try:
                call.prompt, call.input_guard = policy.input.whole(call.prompt)
            except ContentBlocked as blocked:
                call.input_guard = blocked.verdict
                param = "messages" if call.endpoint == "chat.completions" else "prompt"
                raise InputBlocked(str(blocked), code="input_blocked", param=param) from None
        return self._row(call)

    async def _send_screened(
        self, call: _Call, row: TritonRow, *, stream: bool = False, request_id: str = ""
    ) -> tuple[_Responses, TritonAnswer]:
        """`_send`, while the input is screened for prompt injection: the answer (or a stream's first piece)
        waits for the verdict, and a blocked request cancels its generation. Side by side, a benign request
        waits only for the longer of the two, not for their sum."""
        assert call.policy is not None
        if not call.policy.input.screens:
            return await self._send(row, stream=stream, request_id=request_id)
        screen = asyncio.ensure_future(self._screen(call))
        generation = asyncio.ensure_future(self._send(row, stream=stream, request_id=request_id))
        try:
            await asyncio.wait({screen, generation}, return_when=asyncio.FIRST_COMPLETED)
            await screen
            return await generation
        except BaseException:
            screen.cancel()
            generation.cancel()
            await asyncio.gather(screen, generation, return_exceptions=True)
            if generation.done() and not generation.cancelled() and generation.exception() is None:
                # Answered (or, streaming, begun) before the verdict blocked it.
                if stream:
                    generation.result()[0].cancel()
                    self._cancel_soon(request_id)
                else:
                    self._release_soon(generation.result()[0])
            raise

    async def _screen(self, call: _Call) -> None:
        """Screen what the caller wrote for prompt injection; InputBlocked when the policy blocks it."""
        request = call.request
        written = (
            [message.content for message in request.messages if message.role in ("user", "tool") and message.content]
            if isinstance(request, ChatCompletionRequest)
            else [request.prompt]
        )
        if request.prompt_ref is not None:
            written = [*request.prompt_ref.variables.values(), *written]
        assert call.policy is not None
        try:
            call.screened = await call.policy.input.screen(written)
        except ContentBlocked as blocked:
            call.screened = blocked.verdict
            _add_input_verdict(call, blocked.verdict)
            param = "messages" if call.endpoint == "chat.completions" else "prompt"
            raise InputBlocked(str(blocked), code="input_blocked", param=param) from None
        _add_input_verdict(call, call.screened)

    def _cached(self, call: _Call, row: TritonRow) -> TritonAnswer | None:
        """The cached answer to this call, if the cache holds one it may serve; sets what may be stored."""
        route, policy = call.route, call.policy
        assert route is not None and policy is not None
        hit = None
        if not self.cache.enabled:
            call.cache = "off"
        elif not cacheable(row.temperature, row.seed, call.route_label):
            call.cache = "uncacheable"
        elif call.cache_use is CacheUse.off:
            call.cache = "bypass"
        else:
            prompt = f"{call.prompt_choice.name}:v{call.prompt_choice.version}" if call.prompt_choice else ""
            call.cache_key = CacheKey(
                # A policy may share answers between keys; by default each key sees only its own.
                principal="" if policy.cache_shared else call.principal or "",
                guard_policy=policy.label or "",
                structure=json.dumps(call.structure, sort_keys=True) if call.structure is not None else "",
                context=call.context or "",
                endpoint=call.endpoint,
                served=route.label,
                prompt=prompt,
                model_input=row.prompt,
                max_tokens=row.max_tokens,
                temperature=row.temperature,
                top_p=row.top_p,
                seed=row.seed,
                stop=row.stop,
            )
            hit = self.cache.get(call.cache_key) if call.cache_use is CacheUse.normal else None
            call.cache = "hit" if hit else ("bypass" if call.cache_use is CacheUse.refresh else "miss")
        if call.cache != "off":
            CACHE_LOOKUPS.labels(outcome=call.cache).inc()
        if hit is not None and policy.input.screens:
            if hit.screened is None:
                hit = None  # stored unscreened: generate (and screen) instead
            else:
                # The same model input, screened by the same deterministic detector when it was generated.
                call.screened = hit.screened.replayed()
                _add_input_verdict(call, call.screened)
        if hit is None:
            return None
        call.cached_from = hit.source_inference_id
        return _replayed(hit)

    async def _similar(self, call: _Call) -> TritonAnswer | None:
        """After an exact miss: the answer to a question of the same meaning, when the policy opts in."""
        threshold = call.policy.semantic_threshold if call.policy else None
        if (
            self.semantic is None
            or threshold is None
            or call.cache != "miss"
            or call.question is None
            or call.cache_key is None
        ):
            return None
        call.semantic_key = dataclasses.replace(call.cache_key, model_input=call.context_input or "")
        call.question_vector = await asyncio.to_thread(self._embed, call.question)
        hit = self.semantic.get(call.semantic_key, call.question_vector, threshold)
        if hit is None:
            return None
        call.cache, call.cached_from, call.similarity = "semantic", hit.answer.source_inference_id, hit.similarity
        CACHE_LOOKUPS.labels(outcome="semantic").inc()
        if call.policy.input.screens:
            await self._screen(call)  # another wording: its own verdict, not the stored question's
        return _replayed(hit.answer)

    def _embed(self, text: str) -> Any:
        return self._embedder.encode([text]).numpy()[0]

    def _store(self, call: _Call, answer: TritonAnswer) -> None:
        """Keep a whole answer of a cacheable call (not a replayed one) for the next identical request."""
        if call.cache_key is None or call.cached_from is not None or answer.error:
            return
        if answer.finish_reason not in ("stop", "length"):
            return
        self.cache.put(
            call.cache_key,
            stored := CachedAnswer(
                answer.text,
                answer.finish_reason,
                answer.prompt_tokens,
                answer.completion_tokens,
                call.inference_id,
                call.screened,
            ),
        )
        if self.semantic is not None and call.semantic_key is not None and call.question_vector is not None:
            self.semantic.put(call.semantic_key, call.question_vector, stored)

    def _resolve(self, reference: str, sticky_key: str) -> Route:
        try:
            route = self.routes.resolve(reference, sticky_key)
        except UnknownModelError as error:
            raise NotServed(str(error), code="model_not_found", param="model") from None
        if route.adapter_name is not None and route.adapter_name not in self._loaded():
            raise NotServed(
                f"{route.label} is registered but not loaded on this replica", code="model_not_loaded", param="model"
            )
        return route

    def _release(self, call: _Call) -> None:
        if call.holds is not None:
            self._in_flight[call.holds] -= 1
            if not self._in_flight[call.holds]:
                del self._in_flight[call.holds]
            call.holds = None

    def _render(self, call: _Call) -> str:
        """The model input. A prompt_ref's rendered text leads: as the system message of a chat
        (or the user message when the chat has none), or before the text of a completion."""
        request = call.request
        rendered = self._render_ref(call) if request.prompt_ref is not None else None
        if isinstance(request, ChatCompletionRequest):
            messages = [{"role": message.role, "content": message.content or ""} for message in request.messages]
            if rendered is not None:
                messages = lead_with_prompt(messages, rendered)
            if not messages:
                raise RequestRefused("messages must not be empty", code="invalid_value", param="messages")
            if self._semantic_for(call):
                self._split_question(call, messages)
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self._semantic_for(call):
            call.question, call.context_input = request.prompt, (rendered or "") + QUESTION_MARK
        return request.prompt if rendered is None else rendered + request.prompt

    def _semantic_for(self, call: _Call) -> bool:
        return self.semantic is not None and call.policy is not None and call.policy.semantic_threshold is not None

    def _split_question(self, call: _Call, messages: list[dict[str, str]]) -> None:
        """The semantic cache's question (the last user message) and the model input around it."""
        last = next((index for index in reversed(range(len(messages))) if messages[index]["role"] == "user"), None)
        if last is None or not messages[last]["content"].strip():
            return
        call.question = messages[last]["content"]
        around = [*messages[:last], {"role": "user", "content": QUESTION_MARK}, *messages[last + 1 :]]
        call.context_input = self._tokenizer.apply_chat_template(around, add_generation_prompt=True, tokenize=False)

    def _render_ref(self, call: _Call) -> str:
        reference = call.request.prompt_ref
        assert reference is not None
        try:
            call.prompt_choice = choice = self.prompts.resolve(reference, call.sticky_key)
        except UnknownPromptError as error:
            raise NotServed(str(error), code="prompt_not_found", param="prompt_ref") from None
        try:
            return render_template(choice.template, reference.variables, needs=choice.variables)
        except MissingVariable as error:
            missing = ", ".join(error.missing) or str(error)
            raise RequestRefused(
                f"prompt {choice.name}:v{choice.version} needs variable(s) {missing}",
                code="missing_variable",
                param="prompt_ref.variables",
            ) from None
        except PromptError as error:
            raise RequestRefused(
                f"prompt {choice.name}:v{choice.version} cannot be rendered: {error}",
                code="invalid_prompt",
                param="prompt_ref",
            ) from None

    def _row(self, call: _Call) -> TritonRow:
        request, limits = call.request, self._settings
        max_tokens = request.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise RequestRefused(
                f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens_limit}",
                code="invalid_value",
                param="max_tokens",
            )
        prompt_tokens = len(self._tokenizer.encode(call.prompt, add_special_tokens=False))
        if prompt_tokens == 0:
            raise RequestRefused("the prompt is empty", code="invalid_value", param="prompt")
        if prompt_tokens > limits.max_prompt_tokens:
            raise RequestRefused(
                f"the prompt has {prompt_tokens} tokens, over the limit of {limits.max_prompt_tokens}",
                code="context_length_exceeded",
                param="messages" if call.endpoint == "chat.completions" else "prompt",
            )
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        if len(stop) > MAX_STOP_SEQUENCES:
            raise RequestRefused(
                f"stop has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                code="invalid_value",
                param="stop",
            )
        if request.seed is not None and not 0 <= request.seed < 2**63:
            raise RequestRefused(
                f"seed {request.seed} is out of range: use an integer from 0 to 2**63 - 1",
                code="invalid_value",
                param="seed",
            )
        return TritonRow(
            call.prompt,
            call.route.adapter_name if call.route else None,
            max_tokens,
            request.temperature,
            request.top_p,
            request.seed,
            stop,
        )

    def _connect(self) -> Any:
        import tritonclient.grpc.aio as triton_grpc

        if self._client is None:
            self._client = triton_grpc.InferenceServerClient(self._url)
        return self._client

    async def _send(
        self, row: TritonRow, *, stream: bool = False, request_id: str = ""
    ) -> tuple[_Responses, TritonAnswer]:
        """Open a gRPC stream to the decoupled model (the request joins the running batch at once) and
        await its first response: the whole answer, or with `stream` the first piece."""
        import tritonclient.grpc.aio as triton_grpc

        client = self._connect()

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self._triton_model,
                "inputs": infer_inputs(triton_grpc, row, stream=stream, request_id=request_id),
                "outputs": infer_outputs(triton_grpc),
            }

        responses = _Responses(
            client.stream_infer(one_request(), stream_timeout=self._settings.triton_timeout_s), client
        )
        try:
            return responses, await self._next(responses)
        except BaseException:
            responses.cancel()
            raise

    async def _next(self, responses: _Responses) -> TritonAnswer:
        import grpc
        from tritonclient.utils import InferenceServerException

        try:
            result, error = await anext(responses.calls)
            if error is not None:
                raise error
            return parse_answer(result)
        except StopAsyncIteration:
            reason = "the stream closed without an answer"
        except (InferenceServerException, grpc.RpcError) as error:
            # The stream's errors come unwrapped from grpc, unlike unary calls' InferenceServerException.
            reason = error.message() if isinstance(error, InferenceServerException) else error.details()  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # grpc raises CancelledError in every call of a channel that is closed under it: another
            # request found Triton gone and closed the channel this one shared. Not a cancelled request.
            reason = "the connection to it was closed after another request failed"
        # A fresh channel next time: one that saw Triton go away can keep failing after it is back.
        # Only the channel this call used: a newer one may already be serving other requests.
        if responses.client is self._client:
            self._client = None
            await responses.client.close()
        raise InferenceUnavailable(f"the inference server is unavailable: {reason}", code="triton_unavailable")

    def _cancel_soon(self, request_id: str) -> None:
        """Ask Triton to drop a stream's request; fire and forget, since the caller may be a cancelled task."""
        self._in_background(self._cancel(request_id))

    def _release_soon(self, responses: _Responses) -> None:
        """Let a stream whose answer has come end on Triton's side, without making the caller wait for it."""
        self._in_background(responses.release(STREAM_RELEASE_WITHIN_S))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, request_id: str) -> None:
        import numpy as np
        import tritonclient.grpc.aio as triton_grpc

        request = triton_grpc.InferInput("request_id", [1, 1], "BYTES")
        request.set_data_from_numpy(np.array([[request_id.encode()]], dtype=np.object_))
        try:
            await self._connect().infer(CANCEL_MODEL_NAME, [request], client_timeout=self._settings.triton_timeout_s)
        except Exception as error:  # noqa: BLE001 - the request then runs to max_tokens; nothing else is lost
            log.warning("could not cancel abandoned request %s on Triton: %s", request_id, error)

    async def settled(self) -> None:
        """Wait for the work the gateway does after its answers have gone: streams read to their end,
        flag-only groundedness scored, and those calls logged."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _emit(self, call: _Call, answer: TritonAnswer | None, triton_ms: float, *, error: str | None = None) -> None:
        """Log the call as it ended now; one whose answer went out before its flag-only groundedness was
        scored is logged once it is, with the times it ended with."""
        total_ms, ended_at = (time.perf_counter() - call.started) * 1000, datetime.now(UTC)
        later, call.grounding_later = call.grounding_later, None
        if later is None or error is not None:
            self._offer(call, answer, triton_ms, error, total_ms, ended_at)
            return

        async def grounded() -> None:
            try:
                await later.ground()  # a flag: it records the score on the call's verdict, it never blocks
            finally:
                self._offer(call, answer, triton_ms, error, total_ms, ended_at)

        self._in_background(grounded())

    def _offer(
        self,
        call: _Call,
        answer: TritonAnswer | None,
        triton_ms: float,
        error: str | None,
        total_ms: float,
        ended_at: datetime,
    ) -> None:
        request, route = call.request, call.route
        compute_ms = answer.compute_ms if answer else 0.0
        event = InferenceLogged(
            inference_id=call.inference_id,
            model_name=route.model_name if route else request.model,
            adapter_version=route.adapter_version if route else None,
            prompt_name=call.prompt_choice.name if call.prompt_choice else None,
            prompt_version=call.prompt_choice.version if call.prompt_choice else None,
            route=call.route_label,
            endpoint=call.endpoint,
            user_id=request.user,
            principal=call.principal,
            input_messages=[message.model_dump(exclude_none=True) for message in request.messages]
            if isinstance(request, ChatCompletionRequest)
            else [],
            input_text=call.prompt,
            output_text=answer.text if answer else "",
            finish_reason="error" if error else (answer.finish_reason if answer else None),
            prompt_tokens=answer.prompt_tokens if answer else 0,
            completion_tokens=answer.completion_tokens if answer else 0,
            latency_queue_ms=max(triton_ms - compute_ms, 0.0),
            latency_compute_ms=compute_ms,
            latency_total_ms=total_ms,
            status=InferenceStatus.error if error else InferenceStatus.ok,
            error=error,
            started_at=call.started_at,
            metadata=dict(request.metadata),
            trace_id=call.trace.trace_id,
            span_id=call.trace.span_id,
            session_id=call.trace.session_id,
            guard_input_outcome=call.input_guard.outcome if call.input_guard else None,
            guard_input_found=sorted(call.input_guard.labels) if call.input_guard else [],
            guard_output_outcome=call.guard.outcome if call.guard else None,
            guard_output_found=sorted(call.guard.labels) if call.guard else [],
            guard_policy=call.policy.label if call.policy else None,
            mean_token_logprob=answer.mean_logprob if answer else None,
            min_token_logprob=answer.min_logprob if answer else None,
        )
        triton = None
        if call.triton_sent_ns:
            triton = TritonCall(self._triton_model, call.triton_sent_ns, call.triton_ended_ns or time.time_ns())
        spans = call_spans(
            event,
            call.trace,
            requested_model=request.model,
            ended_at=ended_at,
            triton=triton,
            answer=answer,
            cached_from=call.cached_from,
            cache_similarity=call.similarity,
            guards=[
                (guard, verdict)
                for guard, verdict in (
                    ((call.policy.input, call.input_guard), (call.policy.output, call.guard)) if call.policy else ()
                )
                if verdict
            ],
        )
        self._log.offer(event, correlation_id=call.inference_id, spans=spans)


def _call(
    endpoint: str,
    request: ChatCompletionRequest | CompletionRequest,
    principal: str | None,
    trace: CallTrace | None,
    cache_use: CacheUse,
) -> _Call:
    return _Call(endpoint, request, principal=principal, trace=trace or CallTrace.start(), cache_use=cache_use)


@dataclass
class _Responses:
    """One gRPC stream to Triton and the channel it runs on."""

    calls: Any
    client: Any

    def cancel(self) -> None:
        self.calls.cancel()

    async def release(self, within_s: float) -> None:
        """Read the stream to its end, so that Triton closes it; cancel it only if that takes over `within_s`.

        Cancelling a stream whose answer has come races Triton's own close of it. tritonserver's stream
        handler can then read a freed call and die of SIGSEGV: CI saw it in
        ModelStreamInferHandler::Process (triton-inference-server/server#8034), and every request paid
        the race when each stream was cancelled after its answer.
        """
        import grpc
        from tritonclient.utils import InferenceServerException

        try:
            async with asyncio.timeout(within_s):
                async for _ in self.calls:
                    pass
        except TimeoutError:
            self.cancel()
        except (grpc.RpcError, InferenceServerException) as error:
            # The caller has its answer; a stream that then fails loses nothing.
            log.debug("a finished Triton stream closed with an error: %s", error)


def _add_input_verdict(call: _Call, verdict: GuardVerdict) -> None:
    """Fold one input check's verdict into the call's (the values guard and the injection screen are one side)."""
    call.input_guard = verdict if call.input_guard is None else call.input_guard.merge(verdict)


def _replayed(answer: CachedAnswer) -> TritonAnswer:
    """A stored answer as a call's answer: no Triton time, no error."""
    return TritonAnswer(answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens, 0.0, "")


def _check_loaded(call: _Call, answer: TritonAnswer) -> None:
    if answer.error:
        # The adapter went away between resolving and batching (an unload raced this request).
        raise NotServed(
            f"{call.route.label if call.route else call.request.model} is not loaded on this replica: {answer.error}",
            code="model_not_loaded",
            param="model",
        )


class Stream:
    """A completion relayed piece by piece as Triton decodes it.

    Ends in exactly one `inference.logged` with the whole output, however it ends: finished,
    failed mid-way, or closed early because the client left (then the request is cancelled on
    Triton and the log has the text sent so far).
    """

    def __init__(self, gateway: Gateway, call: _Call, responses: _Responses, first: TritonAnswer, sent: float) -> None:
        assert call.route is not None
        self.inference_id = call.inference_id
        self.created = int(time.time())
        self.model = call.route.label
        self.finish_reason: str | None = None
        self._gateway = gateway
        self._call = call
        self._responses = responses
        self._pending: TritonAnswer | None = first
        self._sent = sent
        self._pieces: list[str] = []
        self._ended = False
        self.cache = call.cache
        output = call.policy.output if call.policy else None
        self._guarded = output.stream(call.structure, call.context) if output is not None and output.enabled else None

    @property
    def done(self) -> bool:
        return self._ended

    async def next_piece(self) -> str:
        """The next piece of text (possibly empty); `done` turns true with the last one."""
        try:
            answer = self._pending or await self._gateway._next(self._responses)
        except GatewayError as error:
            self._end(None, str(error))
            raise
        self._pending = None
        text = answer.text
        if self._guarded is not None:
            self._call.guard = self._guarded.verdict
            try:
                text = self._guarded.feed(text)
                if answer.finish_reason:
                    if self._guarded.grounds_after_release:
                        self._call.grounding_later = self._guarded
                    else:
                        await self._guarded.ground()
                    text += self._guarded.finish()
            except ContentBlocked as blocked:
                if not answer.finish_reason:
                    self._gateway._cancel_soon(self.inference_id)  # stop decoding what will not be sent
                error = _blocked(blocked)
                self._end(None, str(error))
                raise error from None
        self._pieces.append(text)
        if answer.finish_reason:
            try:
                _check_loaded(self._call, answer)
            except GatewayError as error:
                self._end(answer, str(error))
                raise
            self.finish_reason = answer.finish_reason
            self._end(answer, None)
        return text

    def close(self) -> None:
        """Release the Triton stream; before the last piece, the client left: cancel the request there."""
        if self._ended:
            self._gateway._release_soon(self._responses)
            return
        self._responses.cancel()
        self._gateway._cancel_soon(self.inference_id)
        self._end(None, DISCONNECTED)

    def _end(self, final: TritonAnswer | None, error: str | None) -> None:
        self._ended = True
        self._call.triton_ended_ns = time.time_ns()
        self._gateway._release(self._call)
        text = "".join(self._pieces)
        answer = dataclasses.replace(final, text=text) if final else TritonAnswer(text, "error", 0, 0, 0.0, error or "")
        self._gateway._emit(self._call, answer, (time.perf_counter() - self._sent) * 1000, error=error)
        if error is None:
            self._gateway._store(self._call, answer)


class ReplayedStream:
    """A cached answer relayed as a stream: one piece, the whole text, then its finish reason. Ends in
    exactly one `inference.logged` (route `cache`), as a generated stream does."""

    def __init__(self, gateway: Gateway, call: _Call, answer: TritonAnswer) -> None:
        assert call.route is not None
        self.inference_id = call.inference_id
        self.created = int(time.time())
        self.model = call.route.label
        self.finish_reason: str | None = None
        self.cache = call.cache
        self._gateway = gateway
        self._call = call
        self._answer = answer
        self._ended = False

    @property
    def done(self) -> bool:
        return self._ended

    async def next_piece(self) -> str:
        self._ended = True
        self.finish_reason = self._answer.finish_reason
        self._gateway._emit(self._call, self._answer, 0.0)
        return self._answer.text

    def close(self) -> None:
        if not self._ended:
            self._ended = True
            self._gateway._emit(self._call, None, 0.0, error=DISCONNECTED)
