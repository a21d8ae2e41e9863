"""DecodeBatch and Decoding: sequences joining and leaving a running batch decode as they would alone."""

from __future__ import annotations

import pytest
import torch
from _tiny_decoder import CONTEXT, greedy_alone, tiny_model, tiny_task

from dapeng.errors import ModelError
from dapeng.tasks.causal_lm import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
# (joins before step, prompt, tokens to decode): different lengths, joining at different steps,
# two joining together (one right-padded prefill), leaving at different steps (rows move)
PLAN = [
    (0, [5, 17, 42], 9),
    (2, [7, 8, 9, 10, 11, 12, 13], 4),
    (2, [99], 12),
    (3, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], 6),
    (9, [200, 201], 5),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model(VOCAB)


def decode_in_one_batch(model, plan, growth: int = 64) -> tuple[list[list[int]], list[list[torch.Tensor]], list[int]]:
    """Greedy decoding of `plan` in one DecodeBatch, stepping as the scheduler does.

    Returns each sequence's tokens and logits, and the batch size of every step.
    """
    batch = model.decode_batch() if growth == 64 else type(model.decode_batch())(model, growth=growth)
    tokens: list[list[int]] = [[] for _ in plan]
    logits: list[list[torch.Tensor]] = [[] for _ in plan]
    rows: list[int] = []  # row r of the batch decodes plan[rows[r]]
    sizes: list[int] = []
    step = 0
    while step <= max(p[0] for p in plan) or rows:
        if rows:
            out = batch.step([tokens[i][-1] for i in rows])
            for i, row in zip(rows, out):
                tokens[i].append(int(row.argmax()))
                logits[i].append(row)
        joining = [i for i, p in enumerate(plan) if p[0] == step]
        if joining:
            out = batch.add([plan[i][1] for i in joining])
            rows.extend(joining)
            for i, row in zip(joining, out):
                tokens[i].append(int(row.argmax()))
                logits[i].append(row)
        sizes.append(batch.size)
        for r in reversed(range(len(rows))):
            if len(tokens[rows[r]]) == plan[rows[r]][2]:
                batch.remove(r)  # the last row moves into r
                last = rows.pop()
                if r < len(rows):
                    rows[r] = last
        assert batch.size == len(rows)
        step += 1
    return tokens, logits, sizes


@pytest.mark.parametrize("growth", [64, 4], ids=["preallocated", "growing"])
def test_sequences_joining_and_leaving_decode_exactly_as_alone(model, growth):
    tokens, logits, sizes = decode_in_one_batch(model, PLAN, growth)
    assert max(sizes) >= 3  # sequences really shared steps
    for (_, prompt, n), got, got_logits in zip(PLAN, tokens, logits):
        expected, expected_logits = greedy_alone(model, prompt, n)
        assert got == expected
        torch.testing.assert_close(torch.stack(got_logits), expected_logits, rtol=1e-4, atol=1e-3)


def test_the_tokens_vary(model):
    # a model that repeats one token would make the comparisons above vacuous
    tokens, _ = greedy_alone(model, PLAN[0][1], 12)
    assert len(set(tokens)) >= 3


def test_a_freed_row_is_reused_by_a_sequence_joining_later(model):
    batch = model.decode_batch()
    batch.add([[1, 2, 3], [4, 5]])
    batch.step([6, 7])
    batch.remove(0)  # row 1 moved into row 0
    assert batch.size == 1 and batch.lengths == [3]
    logits = batch.add([[8, 9, 10, 11]])
    assert batch.size == 2 and batch.lengths == [3, 4]
    _, alone = greedy_alone(model, [8, 9, 10, 11], 1)
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-4, atol=1e-3)
    token = int(logits[0].argmax())
    second = batch.step([12, token])
    for row, sequence in enumerate(([4, 5, 7, 12], [8, 9, 10, 11, token])):
        _, alone = greedy_alone(model, sequence, 1)
        torch.testing.assert_close(second[row], alone[0], rtol=1e-4, atol=1e-3)


def test_bad_use_is_a_model_error(model):
    batch = model.decode_batch()
    with pytest.raises(ModelError, match="at least one token"):
        batch.add([[1], []])
    batch.add([[1, 2]])
    with pytest.raises(ModelError, match="1 rows got 2 tokens"):
        batch.step([3, 4])
    with pytest.raises(ModelError, match="no row 1"):
        batch.remove(1)
    with pytest.raises(ModelError, match="max_positions"):
        batch.add([list(range(1, CONTEXT + 1))])


# -- Decoding: one sequence's choices, text and end ------------------------------------------------


@pytest.fixture(scope="module")
def task():
    return tiny_task()


@pytest.fixture(scope="module")
def lm(task):
    return tiny_model(task.tokenizer.get_vocab_size())


def run_decodings(lm, decodings) -> None:
    """Decode several `Decoding`s in one batch, all joining at once, each leaving when it finishes."""
    batch = lm.decode_batch()
    rows = list(decodings)
    for decoding, row in zip(rows, batch.add([d.prompt_ids for d in rows])):
        decoding.choose(row)
    while rows:
        for r in reversed(range(len(rows))):
            if rows[r].finish_reason is not None:
                batch.remove(r)
                last = rows.pop()
                if r < len(rows):
                    rows[r] = last
        if rows:
            for decoding, row in zip(rows, batch.step([d.tokens[-1] for d in rows])):
                decoding.choose(row)


def test_max_new_tokens_ends_a_sequence_with_length(task, lm):
    short = task.decoding("the cat", max_new_tokens=3)
    long = task.decoding("a bird sang", max_new_tokens=11)
    run_decodings(lm, [short, long])
    for decoding, n in ((short, 3), (long, 11)):
        expected, _ = greedy_alone(lm, decoding.prompt_ids, n)
        assert decoding.finish_reason == "length" and decoding.tokens == expected
        assert decoding.text == task.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_stop_id_ends_a_sequence_and_is_not_part_of_its_text(task, lm):
    prompt = "the dog"
    ids = task.prompt_ids(prompt)
    alone, _ = greedy_alone(lm, ids, 8)
    k = alone.index(alone[4])  # the first time the 5th token appears: decoding stops there
    stopping = CausalLM.from_state({**task.state(), "stop_ids": [alone[4]]})
    stopped = stopping.decoding(prompt, max_new_tokens=8)
    other = stopping.decoding("the mat", max_new_tokens=6)  # in the same batch, decodes on
    run_decodings(lm, [stopped, other])
    assert stopped.finish_reason == "stop" and stopped.tokens == alone[: k + 1]
    assert stopped.text == task.tokenizer.decode(alone[:k], skip_special_tokens=True)
    expected, _ = greedy_alone(lm, other.prompt_ids, 6)
    if alone[4] not in expected:
        assert other.finish_reason == "length" and other.tokens == expected


def test_a_stop_string_ends_a_sequence_before_it(task, lm):
    full = task.decoding("the cat", max_new_tokens=10)
    run_decodings(lm, [full])
    text = full.text
    assert len(text) >= 4
    stop = text[2:4]
    cut = task.decoding("the cat", max_new_tokens=10, stop=[stop])
    run_decodings(lm, [cut])
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
