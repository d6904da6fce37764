"""The engine behind a real Triton Inference Server, through PyTriton.

Two Triton models take rendered prompts, each with its adapter name and sampling parameters, and
both hand their rows to one continuous batcher (batcher.py), so requests for different adapters
and from both models share every decode step:
- `flywheel_llm_stream` (decoupled; the gateway's and the benchmark's): Triton's `execute` returns
  at once and the infer generator awaits its row, so every request joins the running batch at the
  next decode step however many are in flight. Decoupled models answer over gRPC streams only.
  With the optional input `stream` true it sends one response per decode step that produced text
  (`text` is the new piece, `finish_reason` empty) and a last one with the finish reason and token
  counts; otherwise one response with the whole answer. One request per execution
  (max_batch_size 1): PyTriton sends each yielded response to every request of an execution, so
  requests streaming at their own pace cannot share one, and batching is the batcher's job anyway.
- `flywheel_llm_cancel` (plain): given a stream's `request_id`, takes that request out of the
  running batch; the gateway calls it when a streaming client disconnects, so an abandoned
  request stops holding a batch slot.
- `flywheel_llm` (plain request/response, for tritonclient HTTP and gRPC `infer`): Triton hands a
  non-decoupled instance its next batch only when the previous one returned, so concurrent plain
  requests decode together only when they arrive in one dynamic batch. More instances would lift
  that, but PyTriton gives extra instances 1 s to find the first one's handshake socket, which a
  busy machine misses (seen here: three start attempts in a row failed).
Per-row problems (an adapter that is not loaded) come back in the row's `error` output instead of
failing the rows batched with it.

Settings that work on a CPU-only machine (PyTriton 0.7, the bundled tritonserver):
- the Python-backend stub links against the interpreter's libpython; LIBDIR must be on
  LD_LIBRARY_PATH of the process that launches tritonserver, or the stub dies with
  "'_thread.RLock' object has no attribute '_recursion_count'" (`_stub_environment` below);
- explicit free ports for HTTP, gRPC and metrics (the defaults 8000-8002 collide between tests and
  replicas), addresses bound to 127.0.0.1, GPU metrics off;
- `log_file` so the server's own output lands in a file, `log_verbose=0` unless debugging;
- the workspace (sockets, the server's copy) in a short temporary directory of our own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import signal
import sysconfig
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infra.processes import free_port, port_is_free, process_alive, process_cmdline, process_started, wait_until
from services.serving.batcher import ContinuousBatcher
from services.runtime.inference import BASE, Engine, GenerationRequest, GenerationResult, SamplingParams
from services.runtime.service import descendant_pids

log = logging.getLogger("flywheel.serving.triton")

MODEL_NAME = "flywheel_llm"
STREAM_MODEL_NAME = "flywheel_llm_stream"
CANCEL_MODEL_NAME = "flywheel_llm_cancel"

INPUTS = ("prompt", "adapter", "max_tokens", "temperature", "top_p", "seed", "stop")
OUTPUTS = (
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "compute_ms",
    "error",
    "timeline_ns",
    "token_logprob",
)
# One row's answer: text, finish_reason, prompt and completion tokens, compute_ms, error, the unix ns
# at which it was queued, joined the batch and finished (zeros until it finished), and the mean and the
# lowest log-probability of its tokens (NaN without tokens).
RowOutput = tuple[str, str, int, int, float, str, tuple[int, int, int], tuple[float, float]]
NO_TIMELINE = (0, 0, 0)
NO_LOGPROB = (math.nan, math.nan)
# How long a restart waits for the dead server's ports before it takes fresh ones.
PORTS_FREED_WITHIN_S = 5.0


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"


def _stub_environment() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [path for path in os.environ.get("LD_LIBRARY_PATH", "").split(":") if path]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TritonServing:
    """Starts the continuous batcher and tritonserver with the engine bound as one dynamically batched model;
    stop() always cleans up both."""

    def __init__(
        self,
        engine: Engine,
        *,
        workdir: Path,
        model_name: str = MODEL_NAME,
        stream_model_name: str = STREAM_MODEL_NAME,
        max_batch_size: int = 32,
        max_queue_delay_us: int = 1_000,
        log_verbose: int = 0,
        ports: TritonPorts | None = None,
    ) -> None:
        self.engine = engine
        self.batcher = ContinuousBatcher(engine, max_active=max_batch_size)
        self.model_name = model_name
        self.stream_model_name = stream_model_name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.workdir = workdir
        self.log_file = workdir / "tritonserver.log"
        self.log_verbose = log_verbose
        self._fixed_ports = ports
        self.ports: TritonPorts | None = None
        self._triton: Any = None
        self._scratch: Path | None = None
        # The running tritonserver and every process below it, pid -> start time (_server_family).
        self._family: dict[int, int] = {}
        self.batches_served = 0
        self.largest_batch = 0
        self._streams: dict[str, Future[GenerationResult]] = {}  # request_id -> its row, while it decodes

    def start(self) -> TritonPorts:
        self.batcher.start()
        try:
            triton, ports = self._launch()
        except BaseException:
            self.batcher.stop()
            raise
        self._triton = triton
        self.ports = ports
        self._family = _server_family(ports.http)
        log.info(
            "triton serving %s: http %s, grpc %s, metrics %s, log %s",
            self.model_name,
            ports.http,
            ports.grpc,
            ports.metrics,
            self.log_file,
        )
        return ports

    def _launch(self) -> tuple[Any, TritonPorts]:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        _stub_environment()
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = self._fixed_ports or TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
        config = TritonConfig(
            http_address="127.0.0.1",
            http_port=ports.http,
            grpc_address="127.0.0.1",
            grpc_port=ports.grpc,
            metrics_address="127.0.0.1",
            metrics_port=ports.metrics,
            allow_gpu_metrics=False,
            log_file=self.log_file,
            log_verbose=self.log_verbose,
        )
        # A short temporary workspace: its unix sockets live there, and a path under a deep
        # FLYWHEEL_HOME can pass the 108-byte AF_UNIX limit ("AF_UNIX path too long").
        self._scratch = Path(tempfile.mkdtemp(prefix="flywheel-triton-"))
        triton = Triton(config=config, workspace=self._scratch / "workspace")  # PyTriton creates it
        try:
            row_inputs = [
                Tensor(name="prompt", dtype=bytes, shape=(1,)),
                Tensor(name="adapter", dtype=bytes, shape=(1,)),
                Tensor(name="max_tokens", dtype=np.int32, shape=(1,)),
                Tensor(name="temperature", dtype=np.float32, shape=(1,)),
                Tensor(name="top_p", dtype=np.float32, shape=(1,)),
                Tensor(name="seed", dtype=np.int64, shape=(1,)),
                Tensor(name="stop", dtype=bytes, shape=(1,)),
            ]
            stream_inputs = [
                Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True),
                Tensor(name="request_id", dtype=bytes, shape=(1,), optional=True),
            ]
            row_outputs = [
                Tensor(name="text", dtype=bytes, shape=(1,)),
                Tensor(name="finish_reason", dtype=bytes, shape=(1,)),
                Tensor(name="prompt_tokens", dtype=np.int32, shape=(1,)),
                Tensor(name="completion_tokens", dtype=np.int32, shape=(1,)),
                Tensor(name="compute_ms", dtype=np.float32, shape=(1,)),
                Tensor(name="error", dtype=bytes, shape=(1,)),
                # The batcher's wall-clock instants, so the gateway's queue and compute spans have their real times.
                Tensor(name="timeline_ns", dtype=np.int64, shape=(3,)),
                Tensor(name="token_logprob", dtype=np.float32, shape=(2,)),
            ]
            batched = DynamicBatcher(max_queue_delay_microseconds=self.max_queue_delay_us)
            triton.bind(
                model_name=self.model_name,
                infer_func=self._infer,
                inputs=row_inputs,
                outputs=row_outputs,
                config=ModelConfig(batching=True, max_batch_size=self.max_batch_size, batcher=batched),
                strict=True,
            )
            triton.bind(
                model_name=self.stream_model_name,
                infer_func=self._infer_stream,
                inputs=row_inputs + stream_inputs,
                outputs=row_outputs,
                config=ModelConfig(batching=True, decoupled=True, max_batch_size=1, batcher=DynamicBatcher()),
                strict=True,
            )
            triton.bind(
                model_name=CANCEL_MODEL_NAME,
                infer_func=self._cancel,
                inputs=[Tensor(name="request_id", dtype=bytes, shape=(1,))],
                outputs=[Tensor(name="cancelled", dtype=np.bool_, shape=(1,))],
                config=ModelConfig(batching=True, max_batch_size=self.max_batch_size, batcher=batched),
                strict=True,
            )
            triton.run()
        except BaseException:
            triton.stop()
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
            raise
        return triton, ports

    def stop(self) -> None:
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()
            log.info("triton stopped")
        _end_leftovers(self._family)
        self._family = {}
        # Also when a restart left no server: the batcher runs from start() on.
        self.batcher.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def is_alive(self) -> bool:
        """Called on the event loop (/readyz, the supervisor), so it must not wait: PyTriton's own
        is_alive waits on a lock its cleanup holds for seconds after the server died, and is_connected
        turns false before that cleanup starts."""
        triton = self._triton
        return triton is not None and triton.is_connected() and triton.is_alive()

    def restart(self) -> TritonPorts:
        """Start tritonserver again after it died. PyTriton stops itself when the server exits and
        never starts it again. The batcher keeps running; the same ports are tried first, so the
        gateway's address stays valid, and fresh ones when another process took them meanwhile."""
        dead, self._triton = self._triton, None
        if dead is not None:
            dead.stop()
        ended = _end_leftovers(self._family)
        if ended:
            log.warning("ended %d process(es) the dead tritonserver left running (its Python-backend stubs)", ended)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        self._fixed_ports = self._fixed_ports or self.ports
        if not _ports_free_within(self._fixed_ports, PORTS_FREED_WITHIN_S):
            # PyTriton waits 120 s for a server that could not bind before it gives up (CI saw a 130 s
            # recovery): a port held by another process means fresh ones at once.
            log.warning("the dead tritonserver's ports %s are taken; starting on fresh ones", self._fixed_ports)
            self._fixed_ports = None
        try:
            self._triton, self.ports = self._launch()
        except Exception:
            log.warning(
                "tritonserver did not start again on ports %s; trying fresh ones", self._fixed_ports, exc_info=True
            )
            self._fixed_ports = None
            self._triton, self.ports = self._launch()
        self._family = _server_family(self.ports.http)
        log.info("triton serving %s again: grpc %s", self.model_name, self.ports.grpc)
        return self.ports

    def __enter__(self) -> TritonServing:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _infer(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """Plain model: submit every row to the continuous batcher and wait for them all."""
        return [_outputs([_row_output(row) for row in rows]) for rows in self._submit(requests)]

    async def _infer_stream(self, requests: list[Any]) -> AsyncIterator[list[dict[str, np.ndarray]]]:
        """Decoupled model: awaited on PyTriton's event loop, so requests overlap; streamed when asked."""
        if len(requests) == 1 and "stream" in requests[0].keys() and bool(requests[0]["stream"].reshape(-1)[0]):  # noqa: SIM118 - PyTriton's Request is no Mapping: `in` on it would scan its inputs
            async for response in self._stream_one(requests[0]):
                yield [response]
            return
        pending = self._submit(requests)
        futures = [asyncio.wrap_future(row) for rows in pending for row in rows if not isinstance(row, str)]
        await asyncio.gather(*futures, return_exceptions=True)
        yield [_outputs([_row_output(row) for row in rows]) for rows in pending]

    async def _stream_one(self, request: Any) -> AsyncIterator[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def push(piece: str | None) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        [row] = self._submit([request], on_text=push)[0]
        if isinstance(row, str):
            yield _outputs([_row_output(row)])
            return
        # Called from the batcher thread after the row's last piece was pushed, so it arrives last.
        row.add_done_callback(lambda _: push(None))
        request_id = _text(request["request_id"].reshape(-1)[0]) if "request_id" in request.keys() else ""  # noqa: SIM118 - as above
        if request_id:
            self._streams[request_id] = row
        try:
            while (piece := await pieces.get()) is not None:
                yield _outputs([(piece, "", 0, 0, 0.0, "", NO_TIMELINE, NO_LOGPROB)])
        finally:
            self._streams.pop(request_id, None)
        _, *final = _row_output(row)
        yield _outputs([("", *final)])

    def _cancel(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """Cancel model: take each named stream's row out of the batch; false for ids not decoding (finished, unknown)."""
        answers = []
        for request in requests:
            found = []
            for value in request["request_id"].reshape(-1):
                row = self._streams.get(_text(value))
                if row is not None:
                    self.batcher.cancel(row)
                found.append([row is not None])
            answers.append({"cancelled": np.array(found, dtype=np.bool_)})
        return answers

    def _submit(
        self, requests: list[Any], on_text: Callable[[str], None] | None = None
    ) -> list[list[Future[GenerationResult] | str]]:
        """Each request's rows as batcher futures, or the error that kept a row out."""
        size = sum(len(request["prompt"]) for request in requests)
        self.batches_served += 1
        self.largest_batch = max(self.largest_batch, size)
        loaded = self.engine.adapters
        pending: list[list[Future[GenerationResult] | str]] = []
        for request in requests:
            rows: list[Future[GenerationResult] | str] = []
            for index in range(len(request["prompt"])):
                adapter = _text(request["adapter"][index][0]) or None
                try:
                    if adapter not in (None, BASE) and adapter not in loaded:
                        raise ValueError(f"adapter {adapter!r} is not loaded")
                    seed = int(request["seed"][index][0])
                    params = SamplingParams(
                        max_tokens=int(request["max_tokens"][index][0]),
                        temperature=float(request["temperature"][index][0]),
                        top_p=float(request["top_p"][index][0]),
                        stop=tuple(json.loads(_text(request["stop"][index][0]) or "[]")),
                        seed=None if seed < 0 else seed,
                    )
                    prompt_ids = self.engine.encode(_text(request["prompt"][index][0]))
                    rows.append(self.batcher.submit(GenerationRequest(prompt_ids, adapter, params), on_text))
                except (ValueError, TypeError) as error:
                    rows.append(str(error))
            pending.append(rows)
        return pending


def _server_family(http_port: int) -> dict[int, int]:
    """The tritonserver this process runs on `http_port` and every process below it (its Python-backend
    stubs and their model proxies), each pid with its start time."""
    for pid in descendant_pids(os.getpid()):
        args = process_cmdline(pid)
        if args and args[0].endswith("tritonserver") and _flag(args, "--http-port") == str(http_port):
            family = [pid, *descendant_pids(pid)]
            return {member: started for member in family if (started := process_started(member)) is not None}
    return {}


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def _ports_free_within(ports: TritonPorts, within_s: float) -> bool:
    """Whether tritonserver could listen on all of `ports` within `within_s`: the kernel frees a killed
    server's sockets as its leftovers exit, and an outgoing connection may have taken one as its own port."""
    wanted = (ports.http, ports.grpc, ports.metrics)
    return wait_until(lambda: all(port_is_free(port) for port in wanted), within_s)


def _end_leftovers(family: dict[int, int]) -> int:
    """SIGKILL what is still running of a stopped or dead server's family; how many that was.

    A SIGKILLed tritonserver leaves its stubs to init, and they hold a model's memory until they notice:
    on a busy machine some outlived it by more than 45 s. They have no server to work for, so nothing is lost.
    The start time keeps a pid given since to another process from being taken for one of them."""
    ended = 0
    for pid, started in family.items():
        if process_started(pid) == started and process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            ended += 1
    return ended


def _row_output(row: Future[GenerationResult] | str) -> RowOutput:
    if isinstance(row, str):
        return ("", "error", 0, 0, 0.0, row, NO_TIMELINE, NO_LOGPROB)
    try:
        result = row.result()
    except Exception as error:  # noqa: BLE001 - one failed row is that row's error, not its batch's
        return ("", "error", 0, 0, 0.0, str(error) or type(error).__name__, NO_TIMELINE, NO_LOGPROB)
    return (
        result.text,
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
        result.compute_ms,
        result.error,
        (result.queued_at_ns, result.admitted_at_ns, result.finished_at_ns),
        _logprob_summary(result.token_logprobs),
    )


def _logprob_summary(logprobs: list[float]) -> tuple[float, float]:
    return (sum(logprobs) / len(logprobs), min(logprobs)) if logprobs else NO_LOGPROB


def _outputs(rows: list[RowOutput]) -> dict[str, np.ndarray]:
    return {
        "text": np.array([[row[0].encode()] for row in rows], dtype=np.object_),
        "finish_reason": np.array([[row[1].encode()] for row in rows], dtype=np.object_),
        "prompt_tokens": np.array([[row[2]] for row in rows], dtype=np.int32),
        "completion_tokens": np.array([[row[3]] for row in rows], dtype=np.int32),
        "compute_ms": np.array([[row[4]] for row in rows], dtype=np.float32),
        "error": np.array([[row[5].encode()] for row in rows], dtype=np.object_),
        "timeline_ns": np.array([list(row[6]) for row in rows], dtype=np.int64),
        "token_logprob": np.array([list(row[7]) for row in rows], dtype=np.float32),
    }


@dataclass(frozen=True)
class TritonRow:
    """One request as sent to the Triton model."""

    prompt: str
    adapter: str | None = None
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TritonAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    compute_ms: float
    error: str
    # Unix ns at which the batcher queued the row, let it join the batch, and finished it; 0 when unknown
    # (a piece of a stream before the last, an answer made up after a failure).
    queued_at_ns: int = 0
    admitted_at_ns: int = 0
    finished_at_ns: int = 0
    # The mean and the lowest log-probability of the answer's tokens under the model (None without
    # tokens, and on every piece of a stream but the last).
    mean_logprob: float | None = None
    min_logprob: float | None = None


def infer_inputs(client_module: Any, row: TritonRow, *, stream: bool = False, request_id: str = "") -> list[Any]:
    """Inputs for one request, built with `tritonclient.http` or `tritonclient.grpc` (same API).

    `stream` and `request_id` are inputs of the stream model only (token-by-token responses, and the id
    the cancel model knows the request by)."""
    values = {
        "prompt": (np.array([[row.prompt.encode()]], dtype=np.object_), "BYTES"),
        "adapter": (np.array([[(row.adapter or "").encode()]], dtype=np.object_), "BYTES"),
        "max_tokens": (np.array([[row.max_tokens]], dtype=np.int32), "INT32"),
        "temperature": (np.array([[row.temperature]], dtype=np.float32), "FP32"),
        "top_p": (np.array([[row.top_p]], dtype=np.float32), "FP32"),
        "seed": (np.array([[-1 if row.seed is None else row.seed]], dtype=np.int64), "INT64"),
        "stop": (np.array([[json.dumps(list(row.stop)).encode()]], dtype=np.object_), "BYTES"),
    }
    if stream:
        values["stream"] = (np.array([[True]], dtype=np.bool_), "BOOL")
    if request_id:
        values["request_id"] = (np.array([[request_id.encode()]], dtype=np.object_), "BYTES")
    inputs = []
    for name, (array, datatype) in values.items():
        tensor = client_module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer_outputs(client_module: Any) -> list[Any]:
    return [client_module.InferRequestedOutput(name) for name in OUTPUTS]


def parse_answer(result: Any) -> TritonAnswer:
    """The answer of one request from a tritonclient InferResult."""

    def first(name: str) -> Any:
        return result.as_numpy(name).reshape(-1)[0]

    timeline = result.as_numpy("timeline_ns")
    queued, admitted, finished = (
        (int(value) for value in timeline.reshape(-1)[:3]) if timeline is not None else NO_TIMELINE
    )
    summary = result.as_numpy("token_logprob")
    mean, lowest = (float(value) for value in summary.reshape(-1)[:2]) if summary is not None else NO_LOGPROB
    return TritonAnswer(
        text=_text(first("text")),
        finish_reason=_text(first("finish_reason")),
        prompt_tokens=int(first("prompt_tokens")),
        completion_tokens=int(first("completion_tokens")),
        compute_ms=float(first("compute_ms")),
        error=_text(first("error")),
        queued_at_ns=queued,
        admitted_at_ns=admitted,
        finished_at_ns=finished,
        mean_logprob=None if math.isnan(mean) else mean,
        min_logprob=None if math.isnan(lowest) else lowest,
    )


def stream_infer(
    grpc_url: str, row: TritonRow, *, model: str = STREAM_MODEL_NAME, timeout_s: float = 600
) -> TritonAnswer:
    """One request to the decoupled model over a gRPC stream (its only door), with tritonclient.grpc."""
    import queue

    import tritonclient.grpc as triton_grpc

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = triton_grpc.InferenceServerClient(grpc_url)
    answered = False
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, infer_inputs(triton_grpc, row), outputs=infer_outputs(triton_grpc))
        result, error = answers.get(timeout=timeout_s)
        answered = True
        if error is not None:
            raise error
        return parse_answer(result)
    finally:
        # An answered stream is left to end on Triton's side: cancelling it races Triton's own close
        # (see the gateway's _Responses.release).
        client.stop_stream(cancel_requests=not answered)
        client.close()
