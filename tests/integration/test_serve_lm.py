"""OpenAI-compatible completions on a real (tiny) language model Artifact, over a real socket."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
from _tiny_lm import serve_in_thread, tiny_lm_artifact

import dapeng

pytestmark = pytest.mark.xdist_group("serve")

@pytest.fixture(scope="module")
def lm_pipeline(tmp_path_factory):
    return dapeng.load(tiny_lm_artifact(tmp_path_factory.mktemp("lm") / "model"), precision="fp32")


@pytest.fixture(scope="module")
def base(lm_pipeline) -> Iterator[str]:
    from dapeng.serve import ServeConfig, create_app

    app = create_app({"tiny-lm": lm_pipeline}, ServeConfig(torch_threads=1, max_new_tokens=16))
    with serve_in_thread(app) as url:
        yield url


def post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_completion_matches_greedy_generate_in_process(base, lm_pipeline):
    body = {"model": "tiny-lm", "prompt": "the cat", "max_tokens": 8, "temperature": 0.0}
    status, raw = post(f"{base}/v1/completions", body)
    assert status == 200
    answer = json.loads(raw)
    expected = lm_pipeline.generate("the cat", max_new_tokens=8, temperature=0.0)
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"] == expected


def test_streamed_chat_uses_the_chat_template_and_ends_with_done(base, lm_pipeline):
    messages = [{"role": "user", "content": "the dog"}]
    body = {"model": "tiny-lm", "messages": messages, "max_tokens": 6, "temperature": 0.0, "stream": True}
    status, raw = post(f"{base}/v1/chat/completions", body)
    assert status == 200
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    generation = lm_pipeline.generate(messages, max_new_tokens=6, temperature=0.0, stream=True)
    assert text == "".join(generation)
    assert chunks[-1]["choices"][0]["finish_reason"] == generation.finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_finish_reason_is_length_when_the_token_budget_runs_out(base, lm_pipeline):
    body = {"model": "tiny-lm", "prompt": "the cat", "max_tokens": 3, "temperature": 0.0}
    generation = lm_pipeline.generate("the cat", max_new_tokens=3, temperature=0.0, stream=True)
    text = "".join(generation)
    status, raw = post(f"{base}/v1/completions", body)
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and choice["text"] == text and choice["finish_reason"] == generation.finish_reason
    if len(text) >= 2:  # a stop string it produces ends it as "stop"
        status, raw = post(f"{base}/v1/completions", {**body, "stop": [text[1:]]})
        assert status == 200 and json.loads(raw)["choices"][0] == {**choice, "text": text[:1], "finish_reason": "stop"}


def test_prompt_too_long_for_the_context_is_a_422(base):
    status, raw = post(f"{base}/v1/completions", {"model": "tiny-lm", "prompt": "the cat sat " * 40, "max_tokens": 4})
    assert status == 422 and json.loads(raw)["error"]["param"] == "prompt"
