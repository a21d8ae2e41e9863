"""DynamicBatcher: batches form while the model is busy, never by waiting out a window."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dapeng.serve.batcher import BatcherStopped, DynamicBatcher, QueueFull


class Model:
    """Doubles numbers; records every batch; can be held busy; fails on negative inputs."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        self.gate.wait(5)
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        return [2 * x for x in items]


def run(coro_fn, model: Model, **kwargs):
    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, pool, **kwargs)
            batcher.start()
            try:
                return await coro_fn(batcher)
            finally:
                model.gate.set()
                await batcher.stop()

    return asyncio.run(main())


async def hold_busy(batcher: DynamicBatcher, model: Model) -> asyncio.Task:
    """Start one request and wait until the model is inside it, held by the gate."""
    model.gate.clear()
    model.entered.clear()
    first = asyncio.ensure_future(batcher.submit([0]))
    await asyncio.to_thread(model.entered.wait, 5)
    return first


def test_lone_request_runs_at_once_with_a_batch_of_one():
    model = Model()
    assert run(lambda b: b.submit([21]), model, max_wait_ms=50) == [42]
    assert model.batches == [[21]]


def test_requests_arriving_while_busy_share_the_next_batch_in_order():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        rest = [asyncio.ensure_future(batcher.submit([i, 100 + i])) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 20
        model.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run(scenario, model, max_batch_size=32, max_wait_ms=0)
    assert first == [0]
    assert rest == [[2 * i, 2 * (100 + i)] for i in range(1, 11)]
    assert model.batches[1] == [x for i in range(1, 11) for x in (i, 100 + i)]
    assert len(model.batches) == 2


def test_batches_never_exceed_max_batch_size():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        rest = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 26)]
        await asyncio.sleep(0.02)
        model.gate.set()
        await first
        return await asyncio.gather(*rest)

    assert run(scenario, model, max_batch_size=8) == [[2 * i] for i in range(1, 26)]
    assert [len(b) for b in model.batches] == [1, 8, 8, 8, 1]


def test_batching_off_runs_one_request_per_forward():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        rest = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 5)]
        model.gate.set()
        await first
        return await asyncio.gather(*rest)

    assert run(scenario, model, max_batch_size=1) == [[2], [4], [6], [8]]
    assert all(len(b) == 1 for b in model.batches)


def test_full_queue_refuses_and_recovers():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        queued = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 5)]
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFull):
            await batcher.submit([99])
        model.gate.set()
        await first
        await asyncio.gather(*queued)
        return await batcher.submit([5])

    assert run(scenario, model, max_queue=4) == [10]


def test_a_bad_input_fails_only_its_own_request():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        good = asyncio.ensure_future(batcher.submit([1, 2]))
        bad = asyncio.ensure_future(batcher.submit([-1]))
        other = asyncio.ensure_future(batcher.submit([3]))
        await asyncio.sleep(0.02)
        model.gate.set()
        await first
        with pytest.raises(ValueError, match="negative"):
            await bad
        return await good, await other

    assert run(scenario, model) == ([2, 4], [6])


def test_timed_out_request_is_dropped_before_its_batch_starts():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        with pytest.raises(TimeoutError):
            await batcher.submit([7], timeout=0.01)
        model.gate.set()
        await first
        return await batcher.submit([8])

    assert run(scenario, model) == [16]
    assert [7] not in model.batches and all(7 not in b for b in model.batches)


def test_cancelled_caller_is_dropped_before_its_batch_starts():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        gone = asyncio.ensure_future(batcher.submit([7]))
        await asyncio.sleep(0.01)
        gone.cancel()  # the HTTP client went away
        await asyncio.sleep(0)
        model.gate.set()
        await first
        return await batcher.submit([8])

    assert run(scenario, model) == [16]
    assert all(7 not in b for b in model.batches)


def test_stop_finishes_accepted_work_then_refuses():
    model = Model()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, pool)
            batcher.start()
            first = await hold_busy(batcher, model)
            queued = asyncio.ensure_future(batcher.submit([3]))
            await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(batcher.stop())
            await asyncio.sleep(0.01)
            with pytest.raises(BatcherStopped):
                await batcher.submit([4])
            model.gate.set()
            await stopping
            return await first, await queued

    assert asyncio.run(main()) == ([0], [6])


def test_wrong_number_of_outputs_is_an_error():
    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(lambda items: items[:-1], pool)
            batcher.start()
            try:
                await batcher.submit([1, 2])
            finally:
                await batcher.stop()

    with pytest.raises(RuntimeError, match="1 outputs for 2 inputs"):
        asyncio.run(main())


def test_refill_wait_gathers_a_burst_into_one_batch():
    model = Model()

    async def scenario(batcher):
        first = await hold_busy(batcher, model)
        burst = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 9)]
        model.gate.set()
        await first
        await asyncio.gather(*burst)
        # 8 callers were just answered: when they come back one by one, they share one batch.
        trickle = []
        for i in range(10, 18):
            trickle.append(asyncio.ensure_future(batcher.submit([i])))
            await asyncio.sleep(0)
        return await asyncio.gather(*trickle)

    assert run(scenario, model, max_wait_ms=300) == [[2 * i] for i in range(10, 18)]
    assert model.batches[-1] == list(range(10, 18))


def test_a_lone_caller_never_waits_for_company():
    model = Model()

    async def scenario(batcher):
        # A window of 30 s would show: each call must finish long before it.
        return [await asyncio.wait_for(batcher.submit([i]), 5) for i in range(3)]

    assert run(scenario, model, max_wait_ms=30_000) == [[0], [2], [4]]
    assert model.batches == [[0], [1], [2]]
