"""Dynamic batching: many concurrent requests, one forward pass.

The policy that holds at every load (measured in `benchmarks/serve.py`): a batch starts
as soon as the model is free. While a forward pass runs, new requests queue up; when it
ends, everything queued (up to `max_batch_size` items) goes into the next pass. At low
load a lone request therefore runs at once instead of waiting for a batch window to
expire, and at high load batches fill by themselves. `max_wait_ms` only bridges the
gap while callers are still coming back: when a batch ends, the items already queued
plus the items just answered (whose callers are likely to send again) are the demand
to expect; if fewer than that are queued when the next batch could start, it waits at
most `max_wait_ms` for them. A lone caller (demand 1) never waits.

The forward pass runs in one worker thread (`executor`), off the event loop, so the
HTTP side keeps answering while the model computes. Requests whose caller gave up
(timeout, disconnect) before their batch started are dropped, not computed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from dapeng.errors import DapengError

__all__ = ["BatcherStopped", "DynamicBatcher", "QueueFull"]


class QueueFull(DapengError):
    """The batcher's queue holds `max_queue` items already; the caller should retry later."""


class BatcherStopped(DapengError):
    """The batcher is shutting down and takes no new work."""


@dataclass(eq=False)
class _Entry:
    items: list[Any]
    future: asyncio.Future[list[Any]]
    enqueued: float = field(default_factory=time.perf_counter)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class DynamicBatcher:
    """Groups the items of concurrent `submit` calls into batches for `predict`.

    Args:
        predict: called in the worker thread with a flat list of items; returns one
            output per item, in order.
        executor: the worker that runs `predict` (one thread: the model runs one batch
            at a time, and torch keeps the threads it was given).
        max_batch_size: most items in one call of `predict`; 1 turns batching off.
        max_wait_ms: longest extra wait for a batch to refill once the model is free
            (see the module docstring); 0 never waits.
        max_queue: most items waiting; beyond it `submit` raises `QueueFull`.
        on_batch: called on the event loop after each batch with (batch size, seconds).
    """

    def __init__(
        self,
        predict: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.predict = predict
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: deque[_Entry] = deque()
        self._queued_items = 0
        self._running_items = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._expected = 1

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch that is running)."""
        return self._queued_items

    @property
    def in_flight(self) -> int:
        """Items accepted and not yet answered: queued plus running."""
        return self._queued_items + self._running_items

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._arrived = asyncio.Event()
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dapeng-batcher")

    async def stop(self) -> None:
        """Refuse new work, finish everything already accepted, then end the loop."""
        self._closing = True
        if self._task is None:
            return
        assert self._arrived is not None
        self._arrived.set()
        await self._task
        self._task = None

    async def submit(self, items: Sequence[Any], timeout: float | None = None) -> list[Any]:
        """Queue `items` and wait for their outputs.

        Raises:
            QueueFull: the queue is full.
            BatcherStopped: the batcher is shutting down or not started.
            TimeoutError: no answer within `timeout` seconds (the items are dropped if
                their batch had not started).
            Exception: whatever `predict` raised for these items.
        """
        if self._closing or self._task is None:
            raise BatcherStopped("the model is shutting down", "retry on another replica")
        items = list(items)
        if not items:
            return []
        if self._queued_items + len(items) > self.max_queue:
            raise QueueFull(f"queue full ({self._queued_items} items waiting)", "retry shortly")
        loop = asyncio.get_running_loop()
        entry = _Entry(items, loop.create_future())
        self._queue.append(entry)
        self._queued_items += len(items)
        assert self._arrived is not None
        self._arrived.set()
        # The future ends early on a timeout (below) or when our caller is cancelled (asyncio
        # cancels the future a cancelled task awaits); the loop then skips the entry if its
        # batch has not started. (One timer, not `asyncio.wait_for`'s extra future and task
        # callbacks: this runs once per request.)
        expiry = loop.call_later(timeout, _expire, entry.future) if timeout is not None else None
        try:
            return await entry.future
        finally:
            if expiry is not None:
                expiry.cancel()

    async def _loop(self) -> None:
        assert self._arrived is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._maybe_wait_for_refill()
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _maybe_wait_for_refill(self) -> None:
        """Wait up to `max_wait` while fewer items are queued than the demand to expect."""
        assert self._arrived is not None
        target = min(self._expected, self.max_batch_size)
        if self.max_wait <= 0 or self._closing or self._queued_items >= target:
            return
        deadline = time.perf_counter() + self.max_wait
        while self._queued_items < target and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Entry]:
        batch: list[_Entry] = []
        size = 0
        while self._queue:
            entry = self._queue[0]
            if entry.future.done():  # the caller gave up before its batch started
                self._queue.popleft()
                self._queued_items -= len(entry.items)
                continue
            if batch and size + len(entry.items) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_items -= len(entry.items)
            batch.append(entry)
            size += len(entry.items)
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        size = sum(len(e.items) for e in batch)
        self._running_items = size
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self._compute, [e.items for e in batch])
        finally:
            self._running_items = 0
        # The callers answered now will probably send again: expect them back with those queued.
        self._expected = self._queued_items + size
        if self.on_batch is not None:
            self.on_batch(size, time.perf_counter() - start)
        for entry, result in zip(batch, results):
            if entry.future.done():
                continue
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)

    def _compute(self, groups: list[list[Any]]) -> list[list[Any] | BaseException]:
        """Runs in the worker thread: one forward for all groups, or one per group on failure.

        Falling back to one call per request keeps a single bad input from failing the
        other requests that happened to share its batch.
        """
        flat = [item for group in groups for item in group]
        try:
            outputs = self._predict_checked(flat)
        except Exception as batch_error:
            if len(groups) == 1:
                return [batch_error]
            results: list[list[Any] | BaseException] = []
            for group in groups:
                try:
                    results.append(self._predict_checked(group))
                except Exception as error:
                    results.append(error)
            return results
        results = []
        offset = 0
        for group in groups:
            results.append(outputs[offset : offset + len(group)])
            offset += len(group)
        return results

    def _predict_checked(self, items: list[Any]) -> list[Any]:
        outputs = list(self.predict(items))
        if len(outputs) != len(items):
            raise RuntimeError(f"predict returned {len(outputs)} outputs for {len(items)} inputs")
        return outputs
