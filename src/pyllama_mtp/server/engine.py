"""Continuous batching: one engine thread owns the decoder and serves every request.

Requests wait in a bounded queue; between two steps the engine moves waiting requests
into free sequence slots (prefilling their prompts), drops the ones whose client went
away, and runs one batched step over every busy slot, each with its own sampler,
grammar, stop strings, token budget and draft length. A request leaves its slot the
step it finishes, so a new one never waits for a whole batch.

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

import numpy as np

from ..answer import Prompt, Sampling, TokenOutput, Usage, token_budget
from ..context import Batch, Context
from ..errors import GrammarDeadEndError, InvalidArgumentError, LlamaError, NonFiniteLogitsError
from ..generation import Sampler
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
    output: TokenOutput
    started: float
    prompt_s: float
    drafted: int = 0
    accepted: int = 0


class _SpeculativeDriver:
    """Slots are the sequences of one MTP speculative decoder."""

    def __init__(self, model: Any, slots: int, n_ctx: int, n_draft: int, adaptive: bool, **context: Any) -> None:
        self.decoder = SpeculativeDecoder.create(model, n_ctx=n_ctx, n_draft=n_draft, n_seq_max=slots,
                                                 adaptive=adaptive, **context)
        self.n_draft = n_draft
        self.adaptive = adaptive

    def start(self, slot: int, job: Job) -> None:
        self.decoder.set_sampling(grammar=job.prompt.grammar, seq_id=slot, **job.sampling.as_kwargs())
        self.decoder.prefill(job.prompt.tokens, slot)

    def step(self, busy: list[Optional[_Busy]]) -> tuple[list[list[int]], list[int], dict[int, Exception]]:
        lengths: list[Optional[int]] = []
        for entry in busy:
            if entry is None:
                lengths.append(0)
            elif entry.job.n_draft is not None:
                lengths.append(min(entry.job.n_draft, self.decoder.n_draft))
            elif self.adaptive and entry.job.sampling.temperature <= 0:
                lengths.append(None)  # the batch-aware plan
            else:
                # A sampled request's draft length never depends on the load, so a fixed
                # seed gives the same answer alone or among others.
                lengths.append(self.n_draft)
        try:
            produced = self.decoder.step(lengths)
        except (NonFiniteLogitsError, GrammarDeadEndError) as error:  # those fail; the others' tokens came
            assert error.produced is not None
            return error.produced, self.decoder.last_drafted, dict(error.failed)
        return produced, self.decoder.last_drafted, {}

    def release(self, slot: int) -> None:
        self.decoder.reset(slot)
        self.decoder.set_sampling(seq_id=slot)  # frees the request's grammar

    def acceptance_at(self) -> list[tuple[int, int]]:
        stats = self.decoder.stats
        return list(zip(stats.drafted_at, stats.accepted_at))

    def close(self) -> None:
        self.decoder.close()


class _PlainDriver:
    """Slots are the sequences of one context; no MTP (``--no-mtp``)."""

    def __init__(self, model: Any, slots: int, n_ctx: int, **context: Any) -> None:
        self.context = Context(model, n_ctx=n_ctx, n_seq_max=slots, **context)
        self.samplers: list[Optional[Sampler]] = [None] * slots
        self.pending = [0] * slots  # each slot's next token, not yet evaluated
        self.evaluated: list[list[int]] = [[] for _ in range(slots)]  # what each slot's memory holds

    def start(self, slot: int, job: Job) -> None:
        self.samplers[slot] = Sampler(grammar=job.prompt.grammar, **job.sampling.as_kwargs())
        self.context.seq_rm(slot)
        self._evaluate(slot, job.prompt.tokens)

    def _evaluate(self, slot: int, tokens: list[int]) -> None:
        """All but the last token into the slot's memory; the last is its pending token."""
        for begin in range(0, len(tokens) - 1, self.context.n_batch):
            chunk = tokens[begin:min(begin + self.context.n_batch, len(tokens) - 1)]
            self.context.decode(Batch(chunk, seq_ids=slot, outputs=False))
        self.evaluated[slot] = list(tokens[:-1])
        self.pending[slot] = tokens[-1]

    def step(self, busy: list[Optional[_Busy]]) -> tuple[list[list[int]], list[int], dict[int, Exception]]:
        slots = [slot for slot, entry in enumerate(busy) if entry is not None]
        self.context.decode(Batch([self.pending[slot] for slot in slots], seq_ids=slots, outputs=True))
        for slot in slots:
            self.evaluated[slot].append(self.pending[slot])
        produced: list[list[int]] = [[] for _ in busy]
        failed: dict[int, Exception] = {}
        for index, slot in enumerate(slots):
            sampler = self.samplers[slot]
            assert sampler is not None
            try:
                self.pending[slot] = self.context.sample(sampler, index)
            except (NonFiniteLogitsError, GrammarDeadEndError) as error:  # that request fails, the others go on
                failed[slot] = error
                continue
            produced[slot] = [self.pending[slot]]
        suspects = [slot for slot, error in failed.items() if isinstance(error, NonFiniteLogitsError)]
        if suspects:
            for slot in self._rebuild(slots, suspects, failed):
                del failed[slot]  # only reached by another's NaN: it goes on next step
        return produced, [0] * len(busy), failed

    def _rebuild(self, slots: list[int], suspects: list[int], failed: dict[int, Exception]) -> list[int]:
        """llama.cpp lets NaN in one sequence's memory reach others (see pmtp_spec_rebuild):
        each suspect is evaluated alone in cleared memory; those whose logits are then
        finite were only reached. The memory is cleared, data included, and every slot but
        the failed ones is evaluated again. Returns the suspects that were only reached."""
        # A failed slot's pending token was evaluated; any other's new pending token was not.
        histories = {slot: self.evaluated[slot] + ([] if slot in failed else [self.pending[slot]]) for slot in slots}
        reached = []
        for slot in suspects:
            self.context.clear()
            self._evaluate(slot, histories[slot])
            self.context.decode(Batch([self.pending[slot]], seq_ids=slot, outputs=True))
            if np.isfinite(self.context.logits(-1)).all():
                reached.append(slot)
        if len(reached) == len(suspects):  # no source alone: they fail together
            reached = []
        self.context.clear()
        for slot in slots:
            if slot not in failed or slot in reached:
                self._evaluate(slot, histories[slot])
        return reached

    def release(self, slot: int) -> None:
        self.context.seq_rm(slot)
        self.evaluated[slot] = []
        sampler, self.samplers[slot] = self.samplers[slot], None
        if sampler is not None:
            sampler.close()

    def acceptance_at(self) -> list[tuple[int, int]]:
        return []

    def close(self) -> None:
        for sampler in self.samplers:
            if sampler is not None:
                sampler.close()
        self.context.close()


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
    #: (drafted, accepted) at each draft position, from the decoder
    acceptance_at: list = field(default_factory=list)


class Engine:
    """The engine thread and its slots. ``n_ctx`` is shared: each slot holds up to
    ``n_ctx // parallel`` tokens (prompt and answer)."""

    def __init__(self, model: Any, *, parallel: int = 1, n_ctx: int = 4096, n_draft: int = 3,
                 adaptive: bool = True, mtp: bool = True, queue_size: int = 64, **context: Any) -> None:
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
        self._driver: Optional[Union[_SpeculativeDriver, _PlainDriver]] = None
        made = threading.Event()
        failure: list[BaseException] = []

        def make() -> Union[_SpeculativeDriver, _PlainDriver]:
            try:
                return (_SpeculativeDriver(model, parallel, n_ctx, n_draft, adaptive, **context) if mtp
                        else _PlainDriver(model, parallel, n_ctx, **context))
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
    def _run(self, make: Callable[[], Union[_SpeculativeDriver, _PlainDriver]]) -> None:
        try:
            self._driver = make()
        except BaseException:
            return  # the constructor raises it
        try:
            self._serve()
        finally:
            self._driver.close()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._waiting and not any(self._busy):
                    self._cond.wait()
                if not self._running:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if any(self._busy):
                    self._step()
            except Exception:  # a bug of ours: log it and keep serving
                logger.exception("engine step failed")
                self._fail_all(RuntimeError("the engine failed during this request; see the server log"))
        for slot, entry in enumerate(self._busy):
            if entry is not None:
                self._finish(slot)
        with self._cond:
            for job in self._waiting:
                job.sink(Failed(QueueFullError("the server is shutting down")))
            self._waiting.clear()

    def _admit(self) -> None:
        for slot in range(self.parallel):
            if self._busy[slot] is not None:
                continue
            with self._cond:
                job = self._waiting.popleft() if self._waiting else None
            if job is None:
                return
            if job.cancelled.is_set():
                self.counters.requests["cancelled"] += 1
                continue
            started = time.perf_counter()
            try:
                self._driver.start(slot, job)
            except Exception as error:  # the request's fault (or llama.cpp's error for it)
                self._release(slot)
                self.counters.requests["failed"] += 1
                job.sink(Failed(error))
                continue
            self.counters.prompt_tokens += len(job.prompt.tokens)
            self._busy[slot] = _Busy(job, TokenOutput(self.model, job.prompt, job.budget), started,
                                     time.perf_counter() - started)
            if self._busy[slot].output.done:  # max_tokens 0
                self._finish(slot)

    def _drop_cancelled(self) -> None:
        for slot, entry in enumerate(self._busy):
            if entry is not None and entry.job.cancelled.is_set():
                self.counters.requests["cancelled"] += 1
                self._release(slot)

    def _step(self) -> None:
        try:
            produced, drafted, failed = self._driver.step(self._busy)
        except Exception as error:
            self._fail_all(error)
            return
        self.counters.steps += 1
        for slot, error in failed.items():
            self._fail(slot, error)
        for slot, entry in enumerate(self._busy):
            if entry is None or not produced[slot]:
                continue
            entry.drafted += drafted[slot]
            entry.accepted += len(produced[slot]) - 1
            pieces = []
            for token in produced[slot]:
                pieces.append(entry.output.push(token))
                if entry.output.done:
                    break
            text = "".join(pieces)
            if text:  # one hand-over per step, however many tokens it produced
                entry.job.sink(Piece(text))
            if entry.output.done:
                self._finish(slot)
        if self.counters.steps % 16 == 1:  # for /metrics; reading the C counters costs a little
            self.counters.acceptance_at = self._driver.acceptance_at()

    def _finish(self, slot: int) -> None:
        entry = self._busy[slot]
        assert entry is not None
        output = entry.output
        tail = output.close()
        if tail:
            entry.job.sink(Piece(tail))
        generation_s = max(time.perf_counter() - entry.started - entry.prompt_s, 1e-9)
        usage = Usage(len(entry.job.prompt.tokens), output.produced, 0, entry.drafted, entry.accepted)
        timings = {"prompt_n": len(entry.job.prompt.tokens), "prompt_ms": entry.prompt_s * 1e3,
                   "predicted_n": output.produced, "predicted_ms": generation_s * 1e3,
                   "predicted_per_second": output.produced / generation_s,
                   "draft_n": entry.drafted, "draft_n_accepted": entry.accepted}
        self.counters.requests["completed"] += 1
        self.counters.completion_tokens += output.produced
        self.counters.drafted += entry.drafted
        self.counters.accepted += entry.accepted
        self._release(slot)
        entry.job.sink(Finished(output.finish_reason or "stop", usage, timings))

    def _release(self, slot: int) -> None:
        self._busy[slot] = None
        try:
            self._driver.release(slot)
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
            self._release(slot)
            entry.job.sink(Failed(error))
