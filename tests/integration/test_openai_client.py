"""The official `openai` client against `dapeng serve` on a real 127.0.0.1 socket, unchanged.

A tiny random LM (`_tiny_lm`) stands in for SmolLM2 where only the protocol matters; the
built-in `minilm-l6` serves the embeddings.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import numpy as np
import pytest
from _tiny_lm import CONTEXT, serve_in_thread, tiny_lm_artifact

import dapeng

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.xdist_group("serve")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return dapeng.load(tiny_lm_artifact(tmp_path_factory.mktemp("lm") / "model"), precision="fp32")


@pytest.fixture(scope="module")
def minilm():
    return dapeng.load("minilm-l6", precision="fp32")


@pytest.fixture(scope="module")
def base(lm, minilm) -> Iterator[str]:
    from dapeng.serve import ServeConfig, create_app

    app = create_app({"tiny-lm": lm, "minilm": minilm}, ServeConfig(torch_threads=1, max_new_tokens=CONTEXT))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(lm, prompt, n: int) -> str:
    return lm.generate(prompt, max_new_tokens=n, temperature=0.0)


def test_models_list_and_retrieve(client):
    assert {m.id for m in client.models.list()} == {"tiny-lm", "minilm"}
    model = client.models.retrieve("tiny-lm")
    assert model.id == "tiny-lm" and model.object == "model" and model.owned_by == "dapeng"


def test_completion_matches_in_process_greedy_and_reports_usage(client, lm):
    answer = client.completions.create(model="tiny-lm", prompt="the cat", max_tokens=8, temperature=0)
    assert answer.choices[0].text == greedy(lm, "the cat", 8)
    prompt_tokens = len(lm.task.prompt_ids("the cat"))
    assert answer.usage.prompt_tokens == prompt_tokens
    assert 1 <= answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens


def test_streamed_completion_with_usage_in_the_last_chunk(client, lm):
    chunks = list(client.completions.create(model="tiny-lm", prompt="the dog", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(lm, "the dog", 8)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_list_prompt_and_n_give_one_choice_each(client, lm):
    answer = client.completions.create(model="tiny-lm", prompt=["the cat", "the dog"], n=2, max_tokens=4,
                                       temperature=0)
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    assert texts == [greedy(lm, "the cat", 4)] * 2 + [greedy(lm, "the dog", 4)] * 2


def test_chat_with_standard_parameters(client, lm):
    answer = client.chat.completions.create(
        model="tiny-lm",
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "cat"}]}],
        max_completion_tokens=6, temperature=0, stop=["zzz", "qqq"], seed=3, presence_penalty=0.0,
        frequency_penalty=0.0, response_format={"type": "text"}, n=2,
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    expected = greedy(lm, messages, 6)
    assert [c.message.content for c in answer.choices] == [expected, expected]
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens >= 2


def test_streamed_chat_matches_the_plain_answer(client):
    body = {"model": "tiny-lm", "messages": [{"role": "user", "content": "the dog"}], "max_tokens": 6,
            "temperature": 0}
    plain = client.chat.completions.create(**body).choices[0]
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason


def test_seeded_sampling_repeats_and_penalties_change_the_text(client):
    body = {"model": "tiny-lm", "prompt": "the cat", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    first, again = (client.completions.create(**body).choices[0].text for _ in range(2))
    assert first == again
    greedy_text = client.completions.create(model="tiny-lm", prompt="the cat", max_tokens=12, temperature=0)
    penalised = client.completions.create(model="tiny-lm", prompt="the cat", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].text != greedy_text.choices[0].text


def test_logprobs_in_both_shapes(client):
    legacy = client.completions.create(model="tiny-lm", prompt="the cat", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(top) <= 2 for top in lp.top_logprobs)  # a dict: tokens of equal text merge
    chat = client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def test_default_budget_is_the_context_not_16_tokens(client, lm):
    answer = client.completions.create(model="tiny-lm", prompt="the", temperature=0)
    assert answer.usage.completion_tokens > 16 or answer.choices[0].finish_reason == "stop"
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.prompt_tokens + answer.usage.completion_tokens == CONTEXT


def test_embeddings_float_and_base64(client, minilm):
    expected = minilm.embed(["a film", "a dog"])
    plain = client.embeddings.create(model="minilm", input=["a film", "a dog"], encoding_format="float")
    assert np.allclose([d.embedding for d in plain.data], expected, atol=1e-5)
    assert plain.usage.prompt_tokens > 0 and plain.usage.total_tokens == plain.usage.prompt_tokens
    default = client.embeddings.create(model="minilm", input="a film")  # the client asks for base64 itself
    assert np.allclose(default.data[0].embedding, expected[0], atol=1e-5)
    raw = client.embeddings.with_raw_response.create(model="minilm", input="a film", encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(raw.http_response.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, expected[0], atol=1e-5)


def test_errors_come_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x")
    assert err.value.body["param"] == "model" and "nope" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="tiny-lm", prompt="x", max_tokens=10_000)
    assert err.value.body["param"] == "max_tokens" and "max_tokens" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    assert err.value.body["param"].startswith("response_format")
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.embeddings.create(model="tiny-lm", input="x")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="tiny-lm", prompt="the cat " * 40)
    assert err.value.body["param"] == "prompt" and "context" in err.value.message


def test_concurrent_requests_share_decoding_steps(base, lm):
    """Eight clients at once get the answers they would get alone, from batches of several sequences."""
    import urllib.request

    prompts = [f"the {w}" for w in ("cat", "dog", "mat", "log", "cat sat", "dog sat", "on", "the")]

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as aclient:
            answers = await asyncio.gather(*(
                aclient.completions.create(model="tiny-lm", prompt=p, max_tokens=24 + i, temperature=0)
                for i, p in enumerate(prompts)))
        return [a.choices[0].text for a in answers]

    assert asyncio.run(ask_all()) == [greedy(lm, p, 24 + i) for i, p in enumerate(prompts)]
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("dapeng_decode_batch_size"))
    steps = float(samples['dapeng_decode_batch_size_count{model="tiny-lm"}'])
    single = float(samples['dapeng_decode_batch_size_bucket{le="1.0",model="tiny-lm"}'])
    assert steps > single  # some steps decoded more than one sequence
    assert float(samples['dapeng_decode_batch_size_sum{model="tiny-lm"}']) > steps
