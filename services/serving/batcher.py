"""Continuous batching: one thread owns decoding; requests join the running batch between decode steps.

Triton's dynamic batcher alone makes a batch wait for its slowest row and makes requests that
arrive mid-batch wait for the whole batch (measured: 0.95x per-request `generate` at concurrency
32). Here every Triton model instance only enqueues its rows and waits on their futures; this
thread prefills newcomers, merges them into the running `DecodeBatch`, runs one joint decode step
over every active row (each with its adapter), and hands each row back as soon as it finishes.
A streaming request also gets its new text after every step (`on_text`), and a request whose
caller went away can be cancelled, which takes it out of the batch at the next step.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from prometheus_client import Gauge

from services.runtime.inference import DecodeBatch, Engine, GenerationRequest, GenerationResult, Row

log = logging.getLogger("flywheel.serving.batcher")

ACTIVE_ROWS = Gauge("flywheel_serving_active_rows", "Requests decoding in the running batch.")
WAITING_ROWS = Gauge("flywheel_serving_waiting_rows", "Requests waiting to join the running batch.")


class BatcherStopped(RuntimeError):
    """The batcher stopped before the request finished."""


CANCELLED = "cancelled"
"""finish_reason of a request cancelled before it finished."""


@dataclass
class _Ticket:
    row: Row
    future: Future[GenerationResult]
    on_text: Callable[[str], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    submitted_ns: int = field(default_factory=time.time_ns)
    admitted_ns: int = 0
    streamed: int = 0  # characters of the row's text already handed to on_text

    def progress(self) -> None:
        if self.on_text is None:
            return
        text = self.row.stable_text()
        if len(text) > self.streamed:
            delta, self.streamed = text[self.streamed :], len(text)
            try:
                self.on_text(delta)
            except Exception:  # noqa: BLE001 - a broken listener loses its stream, not the batcher thread
                log.exception("streaming listener failed; the request still completes")
                self.on_text = None

    def settle(self) -> None:
        result = self.row.result()
        now, now_ns = time.perf_counter(), time.time_ns()
        self.admitted = self.admitted or now
        self.admitted_ns = self.admitted_ns or now_ns
        result.queue_ms = (self.admitted - self.submitted) * 1000
        result.compute_ms = (now - self.admitted) * 1000
        result.queued_at_ns, result.admitted_at_ns, result.finished_at_ns = self.submitted_ns, self.admitted_ns, now_ns
        self.future.set_result(result)


class ContinuousBatcher:
    def __init__(self, engine: Engine, *, max_active: int = 32) -> None:
        self.engine = engine
        self.max_active = max_active
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self._active: list[_Ticket] = []
        self._batch: DecodeBatch | None = None
        self._cancelled: set[Future[GenerationResult]] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.largest_batch = 0
        self.cancelled = 0

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="continuous-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still waiting or decoding fail with BatcherStopped."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(
        self, request: GenerationRequest, on_text: Callable[[str], None] | None = None
    ) -> Future[GenerationResult]:
        """Queue `request`; `on_text`, if given, is called from the batcher thread with each new piece of text."""
        future: Future[GenerationResult] = Future()
        try:
            ticket = _Ticket(self.engine.new_row(request), future, on_text)
        except ValueError as error:
            future.set_exception(error)
            return future
        with self._wake:
            if self._stopping or self._thread is None:
                future.set_exception(BatcherStopped("serving is not running"))
                return future
            self._waiting.append(ticket)
            WAITING_ROWS.set(len(self._waiting))
            self._wake.notify()
        return future

    @property
    def decoding(self) -> int:
        """Requests in the running batch now."""
        return len(self._active)

    def cancel(self, future: Future[GenerationResult]) -> None:
        """Stop generating for a submitted request: it settles with finish_reason "cancelled" and the text so far."""
        with self._wake:
            if not future.done():
                self._cancelled.add(future)
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._active and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                if cancelled:
                    self._waiting = collections.deque(
                        ticket for ticket in self._waiting if not self._cancel_waiting(ticket, cancelled)
                    )
                room = self.max_active - len(self._active)
                newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                WAITING_ROWS.set(len(self._waiting))
            try:
                self._cancel_active(cancelled)
                self._admit(newcomers)
                if self._batch is not None and len(self._batch):
                    self.largest_batch = max(self.largest_batch, len(self._batch))
                    self.engine.step(self._batch)
                    self.steps += 1
            except Exception as error:  # noqa: BLE001 - a failed step fails its rows, never the thread
                log.exception("decode step failed; failing %d request(s)", len(self._active))
                self._fail(self._active, error)
                self._active, self._batch = [], None
            self._settle_finished()
        with self._wake:
            leftovers, self._waiting = [*self._waiting, *self._active], collections.deque()
        self._fail(leftovers, BatcherStopped("serving stopped before this request finished"))
        self._active, self._batch = [], None
        ACTIVE_ROWS.set(0)
        WAITING_ROWS.set(0)

    def _cancel_waiting(self, ticket: _Ticket, cancelled: set[Future[GenerationResult]]) -> bool:
        if ticket.future not in cancelled:
            return False
        ticket.row.finish_reason = CANCELLED
        self.cancelled += 1
        ticket.settle()
        return True

    def _cancel_active(self, cancelled: set[Future[GenerationResult]]) -> None:
        leaving = [ticket for ticket in self._active if ticket.future in cancelled]
        if not leaving:
            return
        for ticket in leaving:
            ticket.row.finish_reason = CANCELLED
        self.cancelled += len(leaving)
        if self._batch is not None:
            # Rows still decoding are exactly those without a finish reason; the cancelled ones leave the KV cache now.
            self._batch.keep([slot for slot, row in enumerate(self._batch.rows) if row.finish_reason is None])

    def _admit(self, newcomers: list[_Ticket]) -> None:
        if not newcomers:
            return
        now, now_ns = time.perf_counter(), time.time_ns()
        for ticket in newcomers:
            ticket.admitted, ticket.admitted_ns = now, now_ns
        self._active += newcomers
        joined = self.engine.prefill([ticket.row for ticket in newcomers])
        if joined is None:
            return
        if self._batch is None or not len(self._batch):
            self._batch = joined
        else:
            self._batch.absorb(joined)

    def _settle_finished(self) -> None:
        still = []
        for ticket in self._active:
            ticket.progress()
            if ticket.row.finish_reason is None:
                still.append(ticket)
            else:
                ticket.settle()
        self._active = still
        ACTIVE_ROWS.set(len(still))

    @staticmethod
    def _fail(tickets: list[_Ticket], error: BaseException) -> None:
        for ticket in tickets:
            if not ticket.future.done():
                ticket.future.set_exception(error)
