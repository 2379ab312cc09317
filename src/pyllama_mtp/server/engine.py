"""Continuous batching: one engine thread owns the decoder and serves every request.

Requests wait in a bounded queue; between two steps the engine moves waiting requests
into free sequence slots (:mod:`pyllama_mtp.slots`: the slot whose cached tokens share
the longest prefix with the prompt, which then decodes only the rest), drops the ones
whose client went away, and runs one batched step over every busy slot, each with its
own sampler, grammar, stop strings, token budget and draft length. A request leaves its
slot the step it finishes, so a new one never waits for a whole batch; the slot keeps
its memory for the next request that shares its prefix.

Results go back through each job's ``sink`` (called on the engine thread: the HTTP layer
hands them to its event loop). Nothing a request does can stop the thread: a request
that fails gets its error, and a step that fails fails only the requests in it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..answer import Prompt, Sampling, Usage, token_budget
from ..context import Context
from ..errors import InvalidArgumentError, LlamaError
from ..session import Session
from ..slots import Slots, SpeculativeSlots
from ..slots_plain import PlainSlots
from ..speculative import SpeculativeDecoder

logger = logging.getLogger(__name__)


class QueueFullError(LlamaError, RuntimeError):
    """Every slot is busy and the waiting queue is full (HTTP 503)."""


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    usage: Usage
    #: llama-server's names: prompt_n, prompt_ms, predicted_n, predicted_ms,
    #: predicted_per_second, draft_n, draft_n_accepted
    timings: dict[str, float]


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Union[Piece, Finished, Failed]


@dataclass
class Job:
    """One request for the engine."""

    prompt: Prompt
    max_tokens: Optional[int]
    sampling: Sampling
    #: this request's MTP draft length (None: the server's policy)
    n_draft: Optional[int]
    sink: Callable[[Event], None]
    #: reuse what a slot holds of the prompt (llama-server's cache_prompt)
    cache_prompt: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    #: the answer's token budget, set by Engine.submit
    budget: int = field(default=0, init=False)

    def cancel(self) -> None:
        """The client went away: the slot is freed at the next step. Thread-safe."""
        self.cancelled.set()


@dataclass
class _Busy:
    job: Job
    session: Session


@dataclass
class EngineCounters:
    """What the engine did (read by /metrics; written by the engine thread only)."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by outcome
    rejected: int = 0  # queue full (counted under the queue's lock, by the submitting thread)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    #: prompt tokens taken from a slot's cache instead of decoded
    cached_tokens: int = 0
    #: seconds the engine thread worked (admitting, stepping, handing out text) and, of
    #: those, seconds llama.cpp computed: the rest is Python on the critical path
    busy_s: float = 0.0
    compute_s: float = 0.0
    #: recurrent-state checkpoints the slots keep (count, bytes)
    checkpoints: int = 0
    checkpoint_bytes: int = 0
    #: (drafted, accepted) at each draft position, from the decoder
    acceptance_at: list = field(default_factory=list)


def make_slots(model: Any, parallel: int, n_ctx: int, *, mtp: bool = True, n_draft: int = 3,
               adaptive: bool = True, max_checkpoints: int = 8, checkpoint_every: int = 2048,
               **context: Any) -> Slots:
    """The engine's slots: a decoder's sequences (MTP) or a context's (plain)."""
    cache = dict(max_checkpoints=max_checkpoints, checkpoint_every=checkpoint_every)
    if mtp:
        decoder = SpeculativeDecoder.create(model, n_ctx=n_ctx, n_draft=n_draft, n_seq_max=parallel,
                                            adaptive=adaptive, **context)
        try:
            return SpeculativeSlots(decoder, **cache)
        except BaseException:
            decoder.close()
            raise
    ctx = Context(model, n_ctx=n_ctx, n_seq_max=parallel, **context)
    try:
        return PlainSlots(ctx, **cache)
    except BaseException:
        ctx.close()
        raise


def close_slots(slots: Slots) -> None:
    slots.close()
    owner = slots.decoder if isinstance(slots, SpeculativeSlots) else slots.context
    owner.close()


class Engine:
    """The engine thread and its slots. ``n_ctx`` is shared: each slot holds up to
    ``n_ctx // parallel`` tokens (prompt and answer)."""

    def __init__(self, model: Any, *, parallel: int = 1, n_ctx: int = 4096, n_draft: int = 3,
                 adaptive: bool = True, mtp: bool = True, queue_size: int = 64, max_checkpoints: int = 8,
                 checkpoint_every: int = 2048, **context: Any) -> None:
        for name, value in (("parallel", parallel), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        if n_ctx // parallel < 8:
            raise InvalidArgumentError(f"n_ctx ({n_ctx}) leaves fewer than 8 tokens for each of {parallel} slots")
        self.model = model
        self.parallel = parallel
        self.slot_ctx = n_ctx // parallel
        self.queue_size = queue_size
        self.mtp = mtp
        self.n_draft_max = n_draft if mtp else 0
        self._busy: list[Optional[_Busy]] = [None] * parallel
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = True
        self.counters = EngineCounters()
        # The contexts are made on the engine thread, which does all their computing:
        # llama.cpp's CPU backend (OpenMP) keeps a worker team per calling thread, and a
        # context warmed up on one thread then driven from another ran at half speed
        # (measured: 17 ms per token on one thread, 37 ms after a warm-up on another).
        self._slots: Optional[Slots] = None
        made = threading.Event()
        failure: list[BaseException] = []

        def make() -> Slots:
            try:
                return make_slots(model, parallel, n_ctx, mtp=mtp, n_draft=n_draft, adaptive=adaptive,
                                  max_checkpoints=max_checkpoints, checkpoint_every=checkpoint_every, **context)
            except BaseException as error:
                failure.append(error)
                raise
            finally:
                made.set()

        self._thread = threading.Thread(target=self._run, args=(make,), name="pyllama-mtp-engine", daemon=True)
        self._thread.start()
        made.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    # -- from any thread --------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a request; raises InvalidArgumentError for one that cannot fit a slot and
        QueueFullError when the queue is full."""
        job.budget = token_budget(job.prompt, self.slot_ctx, job.max_tokens)
        with self._cond:
            if not self._running:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                self.counters.rejected += 1
                raise QueueFullError(f"all {self.parallel} slots are busy and {self.queue_size} requests are "
                                     "waiting: try again later")
            self._waiting.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join()

    @property
    def slots_busy(self) -> int:
        return sum(entry is not None for entry in self._busy)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread ------------------------------------------------------------
    def _run(self, make: Callable[[], Slots]) -> None:
        try:
            self._slots = make()
        except BaseException:
            return  # the constructor raises it
        try:
            self._serve()
        finally:
            close_slots(self._slots)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and not any(self._busy):
                    self._cond.wait()
                if not self._running:
                    break
            began = time.perf_counter()
            try:
                self._drop_cancelled()
                self._admit()
                if any(self._busy):
                    self._step()
            except Exception:  # a bug of ours: log it and keep serving
                logger.exception("engine step failed")
                self._fail_all(RuntimeError("the engine failed during this request; see the server log"))
            self.counters.busy_s += time.perf_counter() - began
        for slot, entry in enumerate(self._busy):
            if entry is not None:
                self._finish(slot)
        with self._cond:
            for job in self._waiting:
                job.sink(Failed(QueueFullError("the server is shutting down")))
            self._waiting.clear()

    def _admit(self) -> None:
        while True:
            free = [slot for slot in range(self.parallel) if self._busy[slot] is None]
            if not free:
                return
            with self._cond:
                job = self._waiting.popleft() if self._waiting else None
            if job is None:
                return
            if job.cancelled.is_set():
                self.counters.requests["cancelled"] += 1
                continue
            session = Session(self.model, job.prompt, job.budget, job.sampling, job.n_draft)
            slot = self._slots.choose(free, job.prompt.tokens)
            try:
                self._slots.start(slot, session, reuse=job.cache_prompt)
            except Exception as error:  # the request's fault (or llama.cpp's error for it)
                self.counters.requests["failed"] += 1
                job.sink(Failed(error))
                continue
            self.counters.prompt_tokens += len(job.prompt.tokens)
            self.counters.cached_tokens += session.reused
            self._busy[slot] = _Busy(job, session)
            if session.done:  # max_tokens 0
                self._finish(slot)

    def _drop_cancelled(self) -> None:
        for slot, entry in enumerate(self._busy):
            if entry is not None and entry.job.cancelled.is_set():
                self.counters.requests["cancelled"] += 1
                self._release(slot)

    def _step(self) -> None:
        sessions = [entry.session if entry is not None else None for entry in self._busy]
        try:
            produced, drafted, failed = self._slots.step(sessions)
        except Exception as error:
            self._fail_all(error)
            return
        self.counters.steps += 1
        for slot, error in failed.items():
            self._fail(slot, error)
        for slot, entry in enumerate(self._busy):
            if entry is None or not produced[slot]:
                continue
            text = entry.session.push(produced[slot], drafted[slot])
            if text:  # one hand-over per step, however many tokens it produced
                entry.job.sink(Piece(text))
            if entry.session.done:
                self._finish(slot)
        if self.counters.steps % 16 == 1:  # for /metrics; reading the C counters costs a little
            self.counters.acceptance_at = self._slots.acceptance_at()
            self.counters.compute_s = self._slots.compute_s
            self.counters.checkpoints = self._slots.checkpoint_count
            self.counters.checkpoint_bytes = self._slots.checkpoint_bytes

    def _finish(self, slot: int) -> None:
        entry = self._busy[slot]
        assert entry is not None
        session = entry.session
        tail = session.close()
        if tail:
            entry.job.sink(Piece(tail))
        usage, timings = session.usage, session.timings
        self.counters.requests["completed"] += 1
        self.counters.completion_tokens += usage.completion_tokens
        self.counters.drafted += usage.drafted_tokens
        self.counters.accepted += usage.accepted_tokens
        self._release(slot)
        entry.job.sink(Finished(session.finish_reason, usage, timings))

    def _release(self, slot: int, keep: bool = True) -> None:
        """Free the slot; ``keep``: its memory stays as a cached prefix."""
        self._busy[slot] = None
        try:
            if keep:
                self._slots.finish(slot)
            else:
                self._slots.forget(slot)
        except Exception:
            logger.exception("releasing slot %d failed", slot)

    def _fail_all(self, error: BaseException) -> None:
        for slot, entry in enumerate(self._busy):
            if entry is not None:
                self._fail(slot, error)

    def _fail(self, slot: int, error: BaseException) -> None:
        entry = self._busy[slot]
        if entry is not None:
            self.counters.requests["failed"] += 1
            self._release(slot, keep=False)
            entry.job.sink(Failed(error))
