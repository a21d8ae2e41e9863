"""OpenAI-compatible completions on a real (tiny) language model Artifact, over a real socket."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch

import dapeng

pytestmark = pytest.mark.xdist_group("serve")

CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def lm_pipeline(tmp_path_factory):
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    task = TASKS.create("causal-lm", vocab_size=300, block_size=16, chat_template=CHAT, max_length=64)
    task.setup([{"text": "the cat sat on the mat. the dog sat on the log. " * 4}])
    torch.manual_seed(0)
    kwargs = {"vocab_size": task.tokenizer.get_vocab_size(), "hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1,
              "intermediate": 32, "max_positions": 64}
    path = save_artifact(tmp_path_factory.mktemp("lm") / "model", model=MODELS.create("lm", **kwargs),
                         model_name="lm", model_kwargs=kwargs, task_name="causal-lm", task_state=task.state())
    return dapeng.load(path, precision="fp32")


@pytest.fixture(scope="module")
def base(lm_pipeline) -> Iterator[str]:
    import uvicorn

    from dapeng.serve import ServeConfig, create_app

    app = create_app({"tiny-lm": lm_pipeline}, ServeConfig(torch_threads=1, max_new_tokens=16))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)


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
