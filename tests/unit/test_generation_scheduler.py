"""GenerationScheduler: queued requests fill the batch up to max_batch_size, freed slots are reused."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from _tiny_decoder import greedy_alone, tiny_pipeline

from dapeng.serve.scheduler import GenerationScheduler
from dapeng.tasks.causal_lm import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [("the cat", 7), ("a bird sang in the", 3), ("the", 12), ("dog sat on the log", 5), ("mat", 9),
           ("the tree", 4)]


@pytest.fixture(scope="module")
def pipeline():
    return tiny_pipeline()


def one_worker() -> ThreadPoolExecutor:
    """The model's worker thread, on one torch thread as the server's (OpenMP keeps the setting per thread)."""
    return ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))


def greedy(pipeline, prompt: str, n: int) -> str:
    return pipeline.generate(prompt, max_new_tokens=n, temperature=0.0)


async def collect(sequence) -> tuple[str, str | None]:
    """The text of a sequence's events and its finish reason."""
    text, finish = "", None
    async for event in sequence:
        assert event.error is None
        text += event.piece
        finish = event.finish_reason
    return text, finish


def test_queued_sequences_fill_the_batch_up_to_max_batch_size_and_decode_as_alone(pipeline):
    sizes: list[int] = []

    async def main():
        with one_worker() as worker:
            scheduler = GenerationScheduler(pipeline, worker, max_batch_size=3,
                                            on_step=lambda size, seconds: sizes.append(size))
            busy = threading.Event()  # the worker is held busy: every sequence is queued before the first step
            worker.submit(busy.wait, 30)
            sequences = [scheduler.submit(pipeline.task.decoding(p, max_new_tokens=n)) for p, n in PROMPTS]
            assert scheduler.queue_depth == len(PROMPTS) and scheduler.in_flight == len(PROMPTS)
            busy.set()
            results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in sequences)), 60)
            return results, scheduler.queue_depth, scheduler.in_flight

    results, depth, in_flight = asyncio.run(main())
    assert max(sizes) == 3  # full batches, never more
    assert sizes[0] == 3  # the first step prefilled three at once
    for (prompt, n), (text, finish) in zip(PROMPTS, results):
        assert text == greedy(pipeline, prompt, n)
        assert finish in ("length", "stop")
    assert depth == 0 and in_flight == 0


def test_a_cancelled_stream_frees_its_slot_for_a_queued_sequence(pipeline):
    sizes: list[int] = []
    stepped, go_on = threading.Event(), threading.Event()

    def on_step(size: int, seconds: float) -> None:
        sizes.append(size)
        stepped.set()
        go_on.wait(30)  # hold the worker after each step until the test has looked

    async def main():
        with one_worker() as worker:
            scheduler = GenerationScheduler(pipeline, worker, max_batch_size=1, on_step=on_step)
            busy = threading.Event()
            worker.submit(busy.wait, 30)
            long = scheduler.submit(pipeline.task.decoding("the cat", max_new_tokens=40))
            queued = scheduler.submit(pipeline.task.decoding("the dog", max_new_tokens=6))
            busy.set()
            await asyncio.to_thread(stepped.wait, 30)  # `long` has its first token
            during = scheduler.queue_depth, scheduler.in_flight
            long.cancel()  # what the server does when a stream's client goes away
            go_on.set()
            text, finish = await asyncio.wait_for(collect(queued), 60)
            return long, during, text, finish, scheduler.queue_depth, scheduler.in_flight

    long, during, text, finish, depth, in_flight = asyncio.run(main())
    assert during == (1, 2)  # one decoding, one waiting for its slot
    assert long.cancelled and long.decoding.finish_reason is None and long.completion_tokens < 40
    assert text == greedy(pipeline, "the dog", 6) and finish in ("length", "stop")
    assert set(sizes) == {1}  # one at a time; dropping the cancelled one is no step of size 0
    assert depth == 0 and in_flight == 0


def test_a_stop_id_ends_one_sequence_of_a_batch_and_the_others_decode_on(pipeline):
    ids = pipeline.task.prompt_ids("the cat")
    alone, _ = greedy_alone(pipeline.model, ids, 10)
    k = alone.index(alone[3])  # where its 4th token first appears: a stop id there ends it
    stopping = CausalLM.from_state({**pipeline.task.state(), "stop_ids": [alone[3]]})
    sizes: list[int] = []

    async def main():
        with one_worker() as worker:
            scheduler = GenerationScheduler(pipeline, worker, max_batch_size=4,
                                            on_step=lambda size, seconds: sizes.append(size))
            busy = threading.Event()
            worker.submit(busy.wait, 30)
            stopped = scheduler.submit(stopping.decoding("the cat", max_new_tokens=10))
            others = [scheduler.submit(pipeline.task.decoding(p, max_new_tokens=n)) for p, n in PROMPTS[:3]]
            busy.set()
            results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in [stopped, *others])), 60)
            return stopped, results, scheduler.in_flight

    stopped, results, in_flight = asyncio.run(main())
    assert stopped.decoding.tokens == alone[: k + 1] and results[0][1] == "stop"
    assert results[0][0] == pipeline.task.tokenizer.decode(alone[:k], skip_special_tokens=True)
    for (prompt, n), (text, _) in zip(PROMPTS[:3], results[1:]):
        assert text == greedy(pipeline, prompt, n)
    assert sizes[0] == 4 and in_flight == 0
