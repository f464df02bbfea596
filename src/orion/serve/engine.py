"""One device, many clients: generations run one at a time, in arrival order, on a worker thread.

The model's programs hold one sequence's KV cache, so requests cannot interleave token by token; instead they wait
in a bounded first-come-first-served queue, and a request whose client is gone leaves it at once (queued: removed;
running: stopped before its next token). The event loop only ever waits on a job's event queue, which the worker
feeds through ``call_soon_threadsafe``: generation never blocks it.

With a draft model every request decodes speculatively (``orion.models.speculative``), whichever adapter it asks
for: adapters live in the target only, and the draft keeps proposing as the base model does. The text stays the
adapted target's, since the target verifies every token; an adapter far from the base only lowers the acceptance.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator

from orion.errors import OrionError


class QueueFull(OrionError):
    """Every place in the queue is taken (the server answers 429)."""


class ShuttingDown(OrionError):
    """The engine is closing and takes no more requests."""


@dataclass
class Request:
    """One generation: prompt token ids, the adapter (None: the base model) and sampling settings."""

    ids: list[int]
    max_tokens: int
    adapter: str | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Finished:
    """The last event of a job that ran to its end: why it stopped and the token counts."""

    finish_reason: str  # "stop": end of text or a stop string; "length": max_tokens or the model's context
    prompt_tokens: int
    completion_tokens: int


class Job:
    """A request inside the engine. Its events (``str`` text pieces, then a :class:`Finished` or an exception) are
    read on the event loop with ``async for event in job``."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.state = "new"  # new -> waiting -> running -> done (changed under the engine's lock)
        self.completion_tokens = 0
        self.last_token: int | None = None
        self._ended = False  # the reader has had the last event
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, event) -> None:
        """Hand an event to the event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._ended:
            raise StopAsyncIteration
        event = await self._events.get()
        self._ended = isinstance(event, Finished | BaseException)
        return event


class StopText:
    """Text pieces in, the text before the first stop string to complete out (as generation would stop there, the
    one that ends first; of two ending together, the longer): a tail that could be the start of a stop string is
    held back until the next piece tells."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.stopped = False
        self._pending = ""

    def push(self, piece: str) -> str:
        text = self._pending + piece
        found = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self._pending = True, ""
            return text[:min(found)[1]]
        keep = next((k for k in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1)
                     if any(s.startswith(text[-k:]) for s in self.stops)), 0)
        self._pending = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


@dataclass
class Metrics:
    """Totals since the server started."""

    completed: int = 0
    cancelled: int = 0  # clients that left before their generation ended
    rejected: int = 0  # turned away with 429: the queue was full
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    compiles: int = 0  # the draft's programs included
    cache_hits: int = 0  # programs loaded from the compile cache instead of compiled
    drafted: int = 0  # speculative decoding: tokens the draft proposed, and how many the target kept
    accepted: int = 0
    backend: str = "none"  # the backend that executed the last generation's programs
    last: dict = field(default_factory=dict)


class Engine:
    """``engine.submit(job)`` queues a job (:class:`QueueFull` past ``max_queue`` waiting jobs), ``engine.cancel(job)``
    takes it out (or stops it), ``engine.close()`` ends every job and the worker. With ``draft``, each generation
    is drafted ``draft_tokens`` tokens at a time by that model and verified by ``model``."""

    def __init__(self, model, max_queue: int = 32, draft=None, draft_tokens: int = 4):
        if max_queue < 1:
            raise OrionError(f"the queue must hold at least one request, got {max_queue}")
        if draft is not None:
            _check_draft(model, draft, draft_tokens)
        self.model = model
        self.draft, self.draft_tokens = draft, draft_tokens
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._lock = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="orion-serve-engine", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests wait for the device); retry later")
            job.state = "waiting"
            self._waiting.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or stop its generation before the next token. A job
        that has ended is left as it is."""
        with self._lock:
            if job.state == "waiting":
                self._waiting.remove(job)
                job.state = "done"
                self.metrics.cancelled += 1
            elif job.state == "running":
                job.cancelled.set()

    def snapshot(self) -> dict:
        """The metrics, with the queue as it is now."""
        with self._lock:
            m = self.metrics
            return {"queue_depth": len(self._waiting), "running": int(self._running is not None),
                    "max_queue": self.max_queue,
                    "requests": {"completed": m.completed, "cancelled": m.cancelled, "rejected": m.rejected,
                                 "failed": m.failed},
                    "tokens": {"prompt": m.prompt_tokens, "completion": m.completion_tokens},
                    "tokens_per_second": m.completion_tokens / m.generation_seconds if m.generation_seconds else 0.0,
                    "generation_seconds": m.generation_seconds, "compiles": m.compiles, "cache_hits": m.cache_hits,
                    "backend": m.backend, "last_generation": dict(m.last),
                    "draft": None if self.draft is None else {
                        "draft_tokens": self.draft_tokens, "drafted": m.drafted, "accepted": m.accepted,
                        "acceptance": m.accepted / m.drafted if m.drafted else 0.0}}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._waiting:
                job.state = "done"
                job.emit(ShuttingDown("the server is shutting down"))
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._lock.notify_all()
        self._worker.join()

    # -- the worker thread -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
                job.state = "running"
            self._run(job)

    def _run(self, job: Job) -> None:
        """Generate ``job``'s text, emitting it as it comes, then its last event."""
        from orion.models.sampling import Sampler
        from orion.models.speculative import speculative_ids

        model, request = self.model, job.request
        stop = StopText(request.stop)
        previous = model.stats  # generation puts a new GenerationStats in its place when it starts
        started = time.perf_counter()
        try:
            model.set_adapter(request.adapter)  # the target's adapter: the draft has none
            sampler = Sampler(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                              seed=request.seed)
            if self.draft is None:
                tokens = model.generate_ids(request.ids, request.max_tokens, sampler, model.stop_ids)
            else:
                tokens = speculative_ids(model, self.draft, request.ids, request.max_tokens, sampler, model.stop_ids,
                                         self.draft_tokens)
            with closing(tokens), closing(model.stream_text(self._counted(job, tokens))) as pieces:
                for piece in pieces:
                    text = stop.push(piece)
                    if text:
                        job.emit(text)
                    if stop.stopped:
                        break
        except Exception as exc:  # the server outlives any one request; the client hears what went wrong
            outcome, last = "failed", exc
        else:
            if job.cancelled.is_set():
                outcome, last = "cancelled", ShuttingDown("the server is shutting down") if self._closed else None
            else:
                rest = stop.flush()
                if rest:
                    job.emit(rest)
                ended = stop.stopped or job.last_token in model.stop_ids
                outcome = "completed"
                last = Finished("stop" if ended else "length", len(request.ids), job.completion_tokens)
        stats = None if model.stats is previous else model.stats  # a speculative run's counts the draft's too
        self._account(job, outcome, time.perf_counter() - started, stats)
        if last is not None:  # after the accounting: a client that has its answer sees it in the metrics
            job.emit(last)

    @staticmethod
    def _counted(job: Job, tokens: Iterator[int]) -> Iterator[int]:
        """``tokens``, counted on ``job``, ending early once the job is cancelled."""
        for token in tokens:
            job.completion_tokens += 1
            job.last_token = token
            yield token
            if job.cancelled.is_set():
                return

    def _account(self, job: Job, outcome: str, seconds: float, stats) -> None:
        """Count a job that has left the device (``outcome``: completed, cancelled or failed)."""
        with self._lock:
            job.state = "done"
            self._running = None
            m = self.metrics
            setattr(m, outcome, getattr(m, outcome) + 1)
            m.prompt_tokens += len(job.request.ids)
            m.completion_tokens += job.completion_tokens
            m.generation_seconds += seconds
            if stats is not None:
                m.compiles += stats.compiles
                m.cache_hits += stats.cache_hits
                m.drafted += stats.drafted
                m.accepted += stats.accepted
                m.backend = stats.backend
                m.last = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": job.completion_tokens,
                          "prefill_tokens_per_second": stats.prefill_tok_s,
                          "decode_tokens_per_second": stats.decode_tok_s, "adapter": job.request.adapter}
                if self.draft is not None:
                    m.last.update(drafted=stats.drafted, accepted=stats.accepted, target_passes=stats.decode_steps)


def _check_draft(model, draft, draft_tokens) -> None:
    """Refuse, before the first request, a draft that every request would refuse."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise OrionError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    if draft is model:
        raise OrionError("the draft must be another model object (load the same weights twice to draft with the "
                         "target itself)")
    ours, theirs = model.tokenizer, draft.tokenizer
    if ours is not None and theirs is not None and ours.vocab_size != theirs.vocab_size:
        raise OrionError(f"the draft's tokenizer has {theirs.vocab_size} tokens, the model's {ours.vocab_size}: a "
                         "draft must share the model's tokenizer")
