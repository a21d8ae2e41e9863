"""A tiny causal LM Artifact with a chat template, and a server on a real 127.0.0.1 socket, for serving tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
CONTEXT = 64


def tiny_lm_artifact(path: Path) -> Path:
    """A 1-layer Llama-layout LM (random weights, scaled so that its tokens vary) on a BPE of a few sentences."""
    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    task = TASKS.create("causal-lm", vocab_size=300, block_size=16, chat_template=CHAT, max_length=CONTEXT)
    task.setup([{"text": "the cat sat on the mat. the dog sat on the log. " * 4}])
    torch.manual_seed(0)
    kwargs = {"vocab_size": task.tokenizer.get_vocab_size(), "hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1,
              "intermediate": 32, "max_positions": CONTEXT}
    model = MODELS.create("lm", **kwargs)
    with torch.no_grad():  # std 0.02 makes every logit nearly equal: the same token over and over
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(40)
    return save_artifact(path, model=model, model_name="lm", model_kwargs=kwargs, task_name="causal-lm",
                         task_state=task.state())


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free 127.0.0.1 port; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
