"""A served prediction does not depend on what else is in its batch.

`dapeng serve` runs on a 127.0.0.1 socket with dynamic batching, serving tiny text
classifiers (a Transformer with mean pooling, a bidirectional LSTM, a text CNN, and a
Transformer whose tokenizer.json pads by itself); 200 requests of mixed lengths go to each
model concurrently, then each text alone, and every answer must match: same label,
probabilities within 1e-3 in fp32 and 1e-2 with `--precision bf16`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("serve")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a", "dull", "moving", "acting"]
LABELS = ["neg", "pos", "mid"]
TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2}
REQUESTS = 200
CONCURRENCY = 32
TRANSFORMER = {"hidden": 16, "layers": 2, "heads": 2, "intermediate": 32, "max_positions": 64}
MODELS = {
    "transformer": ("transformer", TRANSFORMER),
    "lstm": ("lstm", {"embed_dim": 8, "hidden": 6, "layers": 2}),
    "textcnn": ("textcnn", {"embed_dim": 8, "filters": 4}),
    "self-padding-tokenizer": ("transformer", TRANSFORMER),
}


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 40)))) for _ in range(n)]


def _artifact(path: Path, model_name: str, kwargs: dict, tokenizer_path: Path | None = None) -> Path:
    """A text classifier with a confident head (logit std 6, as a trained one's), saved as an Artifact."""
    import torch

    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS as REGISTRY
    from dapeng.tasks import TASKS

    records = [{"text": t, "label": LABELS[i % 3]} for i, t in enumerate(_texts(60, seed=0))]
    options = {"tokenizer_path": str(tokenizer_path)} if tokenizer_path else {}
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=64, max_length=48, **options)
    task.setup(records)
    torch.manual_seed(0)
    kwargs = {**task.model_kwargs(), **kwargs}
    model = REGISTRY.create(model_name, **kwargs).eval()
    with torch.no_grad():
        batch = task.collate(task.encode(records))
        spread = model(batch["input_ids"], batch["attention_mask"]).std()
        model.head.weight.mul_(6.0 / spread)
        model.head.bias.mul_(6.0 / spread)
    return save_artifact(path, model=model, model_name=model_name, model_kwargs=kwargs,
                         task_name="text-classification", task_state=task.state())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    from dapeng.data.tokenizers import train_tokenizer

    root = tmp_path_factory.mktemp("invariance")
    tokenizer = train_tokenizer(_texts(60, seed=0), "word", vocab_size=64)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pads each encode_batch to its longest text
    (root / "tokenizer.json").write_text(tokenizer.to_str())
    return {
        name: _artifact(root / name, model_name, kwargs,
                        root / "tokenizer.json" if name == "self-padding-tokenizer" else None)
        for name, (model_name, kwargs) in MODELS.items()
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=list(TOLERANCE))
def server(request, artifacts, tmp_path) -> Iterator[tuple[str, str]]:
    """`dapeng serve` over the artifacts at one precision; yields (base URL, precision)."""
    precision, port = request.param, _free_port()
    sources = [f"{name}={path}" for name, path in artifacts.items()]
    command = [sys.executable, "-m", "dapeng", "serve", *sources, "--port", str(port), "--threads", "1",
               "--max-batch-size", "32", "--precision", precision, "--log-level", "warning"]
    log_path = tmp_path / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(base):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield base, precision
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


async def _predict_all(urls_and_texts: list[tuple[str, str]], concurrency: int) -> list[dict]:
    """POST each text to its URL, `concurrency` at a time; the one prediction of each request."""
    import aiohttp

    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(session: aiohttp.ClientSession, url: str, text: str) -> dict:
        async with limit, session.post(url, json={"instances": [text]}) as response:
            body = await response.json(content_type=None)
            assert response.status == 200, body
            return body["predictions"][0]

    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await asyncio.gather(*(one(session, url, text) for url, text in urls_and_texts))


def _batches_run(base: str, model: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    prefix = f'dapeng_batch_size_count{{model="{model}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def _differences(together: list[dict], alone: list[dict], tolerance: float) -> list[str]:
    wrong = []
    for i, (a, b) in enumerate(zip(together, alone)):
        gap = max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in b["probabilities"])
        if a["label"] != b["label"] or gap > tolerance:
            wrong.append(f"#{i}: {a['label']} vs {b['label']} alone, probabilities {gap:.1e} apart")
    return wrong


def test_200_concurrent_mixed_length_requests_answer_as_each_text_alone(server):
    base, precision = server
    texts = _texts(REQUESTS, seed=1)
    urls = {name: f"{base}/v1/models/{name}:predict" for name in MODELS}
    jobs = [(urls[name], text) for text in texts for name in MODELS]  # interleaved: every model batches
    together = asyncio.run(asyncio.wait_for(_predict_all(jobs, CONCURRENCY * len(MODELS)), 120))
    batches = {name: _batches_run(base, name) for name in MODELS}
    alone = asyncio.run(asyncio.wait_for(_predict_all(jobs, 1), 120))  # one request in flight: batches of 1
    differing = {}
    for k, name in enumerate(MODELS):
        assert batches[name] < REQUESTS * 0.75, f"{name}: requests were not batched ({batches[name]} batches)"
        differing[name] = _differences(together[k :: len(MODELS)], alone[k :: len(MODELS)], TOLERANCE[precision])
    summary = "; ".join(f"{name}: {len(wrong)} of {REQUESTS} differ ({', '.join(wrong[:2])})"
                        for name, wrong in differing.items() if wrong)
    assert not summary, f"{precision}: {summary}"
