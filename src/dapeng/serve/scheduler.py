"""Continuous batching of generation: concurrent requests share every decoding step.

One loop in the model's worker thread runs the model over a running batch of sequences
(`models.lm.DecodeBatch`), one token per sequence per step. Between two steps, requests
that arrived are prefilled together and join the batch, and sequences that finished (a
stop token, a stop string, their token budget) or whose caller went away (a closed
stream, a time limit) leave it and free their row. A request therefore never waits for
another one to finish, and a step costs about the same for one sequence as for many
on a CPU, where decoding reads every weight once per step whatever the batch size.

Each sequence samples on its own (`tasks.causal_lm.Decoding`: its temperature, top-k/p,
seed, penalties and stop strings). The loop runs only while there is work: the first
request starts it in the worker, and it returns once the batch and the queue are empty.

    scheduler = GenerationScheduler(pipeline, executor, max_batch_size=32)
    sequence = scheduler.submit(pipeline.task.decoding("Once", max_new_tokens=32))
    async for event in sequence:     # Event(piece, logprobs, finish_reason)
        ...
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from dapeng.serve.batcher import BatcherStopped, QueueFull

__all__ = ["Event", "GenerationScheduler", "Sequence", "can_schedule"]


def can_schedule(pipeline: Any) -> bool:
    """Whether `pipeline` generates through a model and task that support continuous batching."""
    model, task = getattr(pipeline, "model", None), getattr(pipeline, "task", None)
    return callable(getattr(model, "decode_batch", None)) and callable(getattr(task, "decoding", None))


@dataclass
class Event:
    """What one step gave a sequence: the text it completed, token log-probabilities, and the end."""

    piece: str = ""
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class Sequence:
    """A submitted generation: iterate for its events (the last one has `finish_reason` or `error`).

    Its events go to its own queue, or to a queue it shares with other sequences (the
    choices of one request) as `(tag, event)` pairs. `cancel()` (or leaving the iteration
    early) takes it out of the batch at the next step.
    """

    def __init__(
        self, decoding: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any] | None = None, tag: Any = None
    ) -> None:
        self.decoding = decoding
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None
        self.tag = tag
        self._queue: asyncio.Queue[Any] = queue if queue is not None else asyncio.Queue()
        self._loop = loop

    @property
    def prompt_tokens(self) -> int:
        return len(self.decoding.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.decoding.tokens)

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        try:
            while True:
                _, event = await self._queue.get()
                yield event
                if event.finish_reason is not None or event.error is not None:
                    return
        finally:
            self.cancel()


class GenerationScheduler:
    """Runs the generations of one model as a continuously refilled batch.

    Args:
        pipeline: a `dapeng.Pipeline` whose model has `decode_batch` and whose task has
            `decoding` (see `can_schedule`).
        executor: the model's worker thread.
        max_batch_size: most sequences decoding at once; 1 runs them one after another.
        max_queue: most sequences waiting or running; beyond it `submit` raises `QueueFull`.
        on_step: called in the worker after each step with (batch size, seconds).
        on_token: called in the worker per generated token with (seconds since the
            sequence's previous token, or since it was submitted for its first; first or not).
    """

    def __init__(
        self,
        pipeline: Any,
        executor: Executor,
        *,
        max_batch_size: int = 32,
        max_queue: int = 1024,
        on_step: Callable[[int, float], None] | None = None,
        on_token: Callable[[float, bool], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.pipeline = pipeline
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.on_step = on_step
        self.on_token = on_token
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # row i of the batch is _running[i]
        self._active = False
        self._closing = False

    @property
    def context(self) -> int:
        """Most positions a sequence may take: the model's and the task's limits."""
        return min(int(self.pipeline.model.max_positions), int(self.pipeline.task.max_length))

    @property
    def queue_depth(self) -> int:
        """Sequences waiting to join the batch."""
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Sequences waiting or decoding."""
        return len(self._waiting) + len(self._running)

    def close(self) -> None:
        """Refuse new sequences; those accepted run to their end."""
        self._closing = True

    def submit(self, decoding: Any, queue: asyncio.Queue[Any] | None = None, tag: Any = None) -> Sequence:
        """Queue one sequence (a `Decoding`); it joins the batch before the next step.

        Args:
            decoding: the sequence's prompt, sampling and text state.
            queue: where its `(tag, Event)` pairs go (default: its own, read by iterating it).
            tag: what identifies it in a shared queue.

        Raises:
            QueueFull: `max_queue` sequences are waiting or running.
            BatcherStopped: the server is shutting down.
        """
        if self._closing:
            raise BatcherStopped("the model is shutting down", "retry on another replica")
        if self.in_flight >= self.max_queue:
            raise QueueFull(f"queue full ({self.in_flight} sequences in flight)", "retry shortly")
        sequence = Sequence(decoding, asyncio.get_running_loop(), queue, tag)
        with self._lock:
            self._waiting.append(sequence)
            start = not self._active
            self._active = True
        if start:
            asyncio.get_running_loop().run_in_executor(self.executor, self._run)
        return sequence

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        batch = self.pipeline.model.decode_batch()
        while True:
            with self._lock:
                joining = self._admit()
                if not joining and not self._running:
                    self._active = False
                    return
            try:
                self._step(batch, joining)
            except Exception as err:  # a bug or an exhausted device: fail these sequences, keep serving
                for sequence in [*self._running, *joining]:
                    self._send(sequence, Event(error=err))
                self._running = []
                batch = self.pipeline.model.decode_batch()

    def _admit(self) -> list[Sequence]:
        joining: list[Sequence] = []
        while self._waiting and len(self._running) + len(joining) < self.max_batch_size:
            sequence = self._waiting.popleft()
            if not sequence.cancelled:
                joining.append(sequence)
        return joining

    def _step(self, batch: Any, joining: list[Sequence]) -> None:
        start = time.perf_counter()
        self._drop_cancelled(batch)
        if not self._running and not joining:
            return  # every running sequence was cancelled: no step ran, none to count in the metrics
        events: list[tuple[Sequence, Event]] = []
        if self._running:
            logits = batch.step([s.decoding.tokens[-1] for s in self._running])
            self._advance(self._running, logits, events)
        if joining:
            logits = batch.add([s.decoding.prompt_ids for s in joining])
            self._running.extend(joining)
            self._advance(joining, logits, events)
        size = len(self._running)
        for row in reversed(range(size)):
            if self._running[row].decoding.finish_reason is not None:
                self._remove(batch, row)
        if events:  # one wake-up of the event loop per step, not one per sequence
            events[0][0]._loop.call_soon_threadsafe(_deliver, events)
        if self.on_step is not None:
            self.on_step(size, time.perf_counter() - start)

    def _advance(self, sequences: list[Sequence], logits: Any, events: list[tuple[Sequence, Event]]) -> None:
        now = time.perf_counter()
        for sequence, row in zip(sequences, logits):
            _, piece = sequence.decoding.choose(row)
            first = sequence.last_token_at is None
            if self.on_token is not None:
                self.on_token(now - (sequence.submitted if first else sequence.last_token_at), first)
            sequence.last_token_at = now
            finish = sequence.decoding.finish_reason
            if piece or finish is not None or sequence.decoding.logprobs is not None:
                events.append((sequence, Event(piece, sequence.decoding.take_logprobs(), finish)))

    def _drop_cancelled(self, batch: Any) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].cancelled:
                self._remove(batch, row)

    def _remove(self, batch: Any, row: int) -> None:
        batch.remove(row)  # the last row moves into `row`: mirror that
        last = self._running.pop()
        if row < len(self._running):
            self._running[row] = last

    def _send(self, sequence: Sequence, event: Event) -> None:
        sequence._loop.call_soon_threadsafe(_deliver, [(sequence, event)])


def _deliver(events: list[tuple[Sequence, Event]]) -> None:
    for sequence, event in events:
        sequence._queue.put_nowait((sequence.tag, event))
