"""The model server on a real socket: load, fuzzing, overload, API key, shutdown, memory.

The server runs in a subprocess (this file doubles as its script: `python test_serve.py
--port-file F ...`) serving three test-local models: `echo` (answers with its input, so
every response can be matched to its request), `tiny` (a real `dapeng.Pipeline` over a
tiny model and a character task) and `lm` (a fake language model for the OpenAI routes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dapeng.tasks.base import Capabilities

# One xdist worker runs them all, in order: they share the module's server.
pytestmark = pytest.mark.xdist_group("serve")

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


# -- the models the test server serves --------------------------------------------------------


class Echo:
    """Answers each input with itself; sleeps `delay` seconds per batch to act like a model."""

    task_name = "echo"
    labels = None
    capabilities = Capabilities(input="text", output="tags", verbs=frozenset({"predict"}))

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def predict(self, items: list, batch_size: int = 32) -> list:
        if self.delay:
            time.sleep(self.delay)
        return [{"echo": item, "batch": len(items)} for item in items]


def tiny_text_artifact(path: Path) -> Path:
    """A 1-layer Transformer text classifier (untrained: serving only needs it to be real)."""
    import numpy as np
    import torch

    from dapeng.hub.artifact import save_artifact
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    rng = np.random.default_rng(0)
    words = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a"]
    records = [{"text": " ".join(rng.choice(words, 5)), "label": ["neg", "pos"][i % 2]} for i in range(40)]
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=64, max_length=32)
    task.setup(records)
    torch.manual_seed(0)
    kwargs = {**task.model_kwargs(), "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "max_positions": 64}
    return save_artifact(path, model=MODELS.create("transformer", **kwargs), model_name="transformer",
                         model_kwargs=kwargs, task_name="text-classification", task_state=task.state())


class Talker:
    """A fake language model: generates the prompt's words backwards."""

    task_name = "causal-lm"
    labels = None
    capabilities = Capabilities(input="text", output="text", verbs=frozenset({"generate"}))

    def generate(self, prompt: str, stream: bool = False, max_new_tokens: int = 16, **kwargs):
        words = [w + " " for w in prompt.split()[::-1][:max_new_tokens]]
        return iter(words) if stream else "".join(words)


def build_app(args: argparse.Namespace):
    from dapeng.pipeline import load
    from dapeng.serve import ServeConfig, create_app

    config = ServeConfig(
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        api_key=args.api_key,
        max_items=8,
        max_input_chars=200,
        max_body_bytes=20_000,
        max_new_tokens=64,
        timeout_s=args.timeout,
        torch_threads=1,
    )
    models = {
        "echo": Echo(args.delay),
        "tiny": load(args.artifact, precision="fp32"),
        "lm": Talker(),
    }
    return create_app(models, config)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--artifact", required=True)
    args = parser.parse_args()
    server = uvicorn.Server(uvicorn.Config(build_app(args), host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=30))

    def announce() -> None:
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        Path(args.port_file).write_text(str(port))

    threading.Thread(target=announce, daemon=True).start()
    server.run()


# -- helpers ----------------------------------------------------------------------------------


@contextmanager
def spawn(tmp_path: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run the test server in a subprocess; yield its base URL and process."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    artifact = tmp_path / "tiny"
    if not artifact.exists():
        tiny_text_artifact(artifact)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--port-file", str(port_file), "--artifact", str(artifact), *flags],
            stdout=log, stderr=log, env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def blast(url: str, bodies: list, concurrency: int, headers: dict | None = None,
                headers_too: bool = False) -> list[tuple]:
    """POST every body to `url` with `concurrency` clients at once; (status, JSON[, headers]) per body."""
    import aiohttp

    results: list = [None] * len(bodies)
    next_index = iter(range(len(bodies)))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in next_index:
            async with session.post(url, json=bodies[i], headers=headers) as response:
                answer = (response.status, await response.json(content_type=None))
                results[i] = (*answer, dict(response.headers)) if headers_too else answer

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return results


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def post(url: str, body: object, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict, object]:
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        text = err.read()
        return err.code, dict(err.headers), json.loads(text) if text.startswith(b"{") else text


def metric(base: str, name: str, model: str) -> float:
    text = get(f"{base}/metrics")[2].decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    with spawn(tmp_path_factory.mktemp("serve"), "--delay", "0.002", "--api-key", KEY) as (base, _):
        yield base


def test_2000_requests_at_concurrency_32_each_answer_matches_its_input(server):
    bodies = [{"instances": [f"request {i}", {"n": i}]} for i in range(2000)]
    results = asyncio.run(blast(f"{server}/v1/models/echo:predict", bodies, 32, AUTH))
    assert all(status == 200 for status, _ in results)
    for body, (_, answer) in zip(bodies, results):
        assert [p["echo"] for p in answer["predictions"]] == body["instances"]
    # Concurrent requests shared forward passes: fewer batches than requests.
    assert metric(server, "dapeng_batch_size_count", "echo") < 2000
    assert max(p["batch"] for _, a in results for p in a["predictions"]) > 2


def test_real_pipeline_answers_like_in_process(server, tmp_path):
    import dapeng

    texts = ["good film", "the plot was awful and poor, a bad film", "unknown words here"]
    status, _, answer = post(f"{server}/v1/models/tiny:predict", {"instances": texts}, AUTH)
    assert status == 200
    local = dapeng.load(tiny_text_artifact(tmp_path / "tiny"), precision="fp32").predict(texts)
    assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in local]
    for remote, here in zip(answer["predictions"], local):
        assert remote["score"] == pytest.approx(here["score"], abs=1e-5)
    status, _, answer = post(f"{server}/v1/models/tiny:explain", {"instances": ["good film"]}, AUTH)
    assert status == 200 and answer["explanations"][0]["words"] == ["good", "film"]


def test_model_listing_health_and_openapi(server):
    status, _, body = get(f"{server}/v1/models", AUTH)
    assert status == 200
    listed = {m["name"]: m for m in json.loads(body)["models"]}
    assert set(listed) == {"echo", "tiny", "lm"}
    assert listed["tiny"]["labels"] == ["neg", "pos"] and listed["lm"]["generates"] is True
    assert get(f"{server}/health")[0] == 200 and get(f"{server}/ready")[0] == 200
    spec = json.loads(get(f"{server}/openapi.json")[2])
    assert {"/v1/models/{name}:predict", "/v1/completions", "/v1/chat/completions", "/metrics"} <= set(spec["paths"])
    predict = spec["paths"]["/v1/models/{name}:predict"]["post"]
    assert {"404", "422", "503", "401"} <= set(predict["responses"])


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/models/echo:predict", {"instance": ["x"]}, "instances"),
        ("/v1/models/echo:predict", {"instances": []}, "instances"),
        ("/v1/models/echo:predict", {"instances": ["x"] * 9}, "instances"),
        ("/v1/models/echo:predict", {"instances": [None]}, "instances"),
        ("/v1/models/tiny:predict", {"instances": [5]}, "instances"),
        ("/v1/models/tiny:predict", {"instances": ["x" * 201]}, "instances"),
        ("/v1/models/tiny:predict", {"instances": [{"txt": "x"}]}, "instances"),
        ("/v1/completions", {"model": "lm", "prompt": "hi", "max_tokens": 1000}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi"}, "model"),
    ],
)
def test_bad_input_is_422_naming_the_field(server, path, body, field):
    status, _, answer = post(f"{server}{path}", body, AUTH)
    assert status == 422
    if path.startswith("/v1/completions"):  # OpenAI's error shape on the OpenAI routes
        assert answer["error"]["param"] == field
    else:
        assert any(field in err["loc"] for err in answer["detail"])


def test_malformed_json_unknown_model_and_big_body(server):
    for raw in (b'{"instances": [', b"\xff\xfe>", b""):
        status, _, answer = post(f"{server}/v1/models/echo:predict", None, AUTH, raw=raw)
        assert status == 422 and answer["detail"][0]["type"] == "json_invalid"
    status, _, answer = post(f"{server}/v1/models/nope:predict", {"instances": ["x"]}, AUTH)
    assert status == 404 and "echo" in answer["detail"]
    status, _, _ = post(f"{server}/v1/models/echo:predict", {"instances": ["x" * 30_000]}, AUTH)
    assert status == 413


def test_api_key_is_enforced(server):
    url = f"{server}/v1/models/echo:predict"
    assert post(url, {"instances": ["x"]})[0] == 401
    assert post(url, {"instances": ["x"]}, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(url, {"instances": ["x"]}, {"X-API-Key": KEY})[0] == 200
    assert get(f"{server}/v1/models")[0] == 401
    assert get(f"{server}/health")[0] == 200


def test_openai_completions_plain_and_streamed(server):
    status, _, answer = post(f"{server}/v1/completions", {"model": "lm", "prompt": "one two three"}, AUTH)
    assert status == 200 and answer["choices"][0]["text"] == "three two one "
    chat = {"model": "lm", "messages": [{"role": "user", "content": "a b"}], "stream": True}
    status, headers, raw = post_stream(f"{server}/v1/chat/completions", chat)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    # Without a chat template the transcript is "user: a b\nassistant:"; Talker says it backwards.
    assert "".join(pieces) == "assistant: b a user: "
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"


def post_stream(url: str, body: dict) -> tuple[int, dict, bytes]:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **AUTH})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()


def test_schemathesis_fuzz_finds_no_server_error(server, tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "10", "--seed", "7", "--workers", "1",
         "--header", f"Authorization: Bearer {KEY}", "--max-time", "20", "--phases", "coverage,fuzzing",
         "--report-dir", str(tmp_path), "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_memory_stays_flat_over_10000_requests(server):
    import psutil

    port = int(server.rsplit(":", 1)[1])
    pid = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
               and c.status == psutil.CONN_LISTEN and c.pid)
    process = psutil.Process(pid)
    url = f"{server}/v1/models/echo:predict"
    asyncio.run(blast(url, [{"instances": [f"warm {i}"]} for i in range(1000)], 32, AUTH))
    before = process.memory_info().rss
    results = asyncio.run(blast(url, [{"instances": [f"req {i}", {"n": i}]} for i in range(10_000)], 32, AUTH))
    after = process.memory_info().rss
    assert all(status == 200 for status, _ in results)
    assert (after - before) / before < 0.05, (before, after)


def test_overload_gives_503_with_retry_after_then_recovers(tmp_path):
    with spawn(tmp_path, "--delay", "0.3", "--max-batch-size", "2", "--max-queue", "4") as (base, _):
        results = asyncio.run(blast(f"{base}/v1/models/echo:predict",
                                    [{"instances": [str(i)]} for i in range(24)], 24, headers_too=True))
        codes = [status for status, _, _ in results]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        rejected = [(answer, headers) for status, answer, headers in results if status == 503]
        assert all("queue full" in a["detail"] and int(h["Retry-After"]) >= 1 for a, h in rejected)
        accepted = [answer for status, answer, _ in results if status == 200]
        assert all(a["predictions"][0]["echo"] in [str(i) for i in range(24)] for a in accepted)
        assert post(f"{base}/v1/models/echo:predict", {"instances": ["again"]})[0] == 200


def test_graceful_shutdown_finishes_accepted_requests_and_refuses_new(tmp_path):
    import aiohttp

    with spawn(tmp_path, "--delay", "0.4", "--max-batch-size", "4") as (base, proc):
        url = f"{base}/v1/models/echo:predict"

        async def run() -> tuple[list, object]:
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> tuple[int, object]:
                    async with session.post(url, json={"instances": [f"in-flight {i}"]}) as response:
                        return response.status, await response.json()

                tasks = [asyncio.ensure_future(one(i)) for i in range(12)]
                while metric(base, "dapeng_in_flight", "echo") < 12:
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                try:
                    async with aiohttp.ClientSession() as fresh, fresh.post(url, json={"instances": ["new"]}) as r:
                        late: object = r.status
                except aiohttp.ClientConnectionError as err:
                    late = err
                return await asyncio.gather(*tasks), late

        answers, late = asyncio.run(run())
        assert [(s, a["predictions"][0]["echo"]) for s, a in answers] == [(200, f"in-flight {i}") for i in range(12)]
        assert late == 503 or isinstance(late, aiohttp.ClientConnectionError)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)



def test_dapeng_serve_command_serves_a_run_with_an_api_key_from_the_environment(tmp_path):
    run = tmp_path / "rt-run"
    tiny_text_artifact(run / "model")
    with socket_port() as port:
        pass
    env = {**os.environ, "DAPENG_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "cli.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dapeng", "serve", str(run), "--port", str(port),
                                 "--threads", "1", "--log-level", "warning"], stdout=log, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, tmp_path / "cli.log")
        status, _, answer = post(f"{base}/v1/models/rt-run:predict", {"instances": ["good film"]}, AUTH)
        assert status == 200 and answer["predictions"][0]["label"] in ("neg", "pos")
        assert post(f"{base}/v1/models/rt-run:predict", {"instances": ["good film"]})[0] == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dapeng_serve_runs_a_runs_onnx_export_with_onnxruntime(tmp_path):
    import dapeng
    from dapeng.cli.main import main

    run = tmp_path / "rt-onnx"
    tiny_text_artifact(run / "model")
    pipe = dapeng.load(run)
    from dapeng.compress.export import export

    texts = ["good film", "the plot was awful and poor, a bad film", "unknown words here", "fine"]
    export(pipe.model, pipe.task, pipe.task.encode([{"text": t} for t in texts]), run / "export-onnx", "onnx",
           artifact_dir=run / "model")
    with socket_port() as port:
        pass
    with open(tmp_path / "cli.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dapeng", "serve", str(run), "--port", str(port),
                                 "--threads", "1", "--backend", "onnxruntime", "--log-level", "warning"],
                                stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, tmp_path / "cli.log")
        status, _, answer = post(f"{base}/v1/models/rt-onnx:predict", {"instances": texts})
        assert status == 200
        local = pipe.predict(texts)
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in local]
        for remote, here in zip(answer["predictions"], local):
            assert remote["score"] == pytest.approx(here["score"], abs=1e-5)
        status, _, info = get(f"{base}/v1/models/rt-onnx")
        assert status == 200 and "explain" not in json.loads(info)["capabilities"]["verbs"]
        status, _, answer = post(f"{base}/v1/models/rt-onnx:explain", {"instances": ["good film"]})
        assert 400 <= status < 500
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert main(["predict", str(run), "--backend", "onnxruntime", "--json", "good film"]) == 0


def _wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if get(f"{base}/ready")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


@contextmanager
def socket_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextmanager
def in_thread(app) -> Iterator[str]:
    """Serve `app` with uvicorn on an ephemeral port from a thread of this process."""
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


def test_time_limit_gives_504_and_chunked_bodies_are_limited_too():
    import http.client

    from dapeng.serve import ServeConfig, create_app

    config = ServeConfig(timeout_s=0.2, max_body_bytes=2048, torch_threads=1)
    with in_thread(create_app({"slow": Echo(delay=1.0)}, config)) as base:
        status, _, answer = post(f"{base}/v1/models/slow:predict", {"instances": ["x"]})
        assert status == 504 and "0.2" in answer["detail"]
        connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
        chunks = iter([b'{"instances": ["', b"y" * 4000, b'"]}'])
        connection.request("POST", "/v1/models/slow:predict", body=chunks, encode_chunked=True,
                           headers={"Content-Type": "application/json"})
        assert connection.getresponse().status == 413


def test_serving_shortens_the_gil_switch_interval_and_restores_it():
    # The model's worker thread waits for the GIL between torch ops; 5 ms waits behind a busy
    # event loop cost batched throughput, so the server asks for 1 ms while it runs.
    from dapeng.serve import ServeConfig, create_app

    before = sys.getswitchinterval()
    with in_thread(create_app({"echo": Echo()}, ServeConfig(torch_threads=1))) as base:
        assert post(f"{base}/v1/models/echo:predict", {"instances": ["x"]})[0] == 200
        assert sys.getswitchinterval() == pytest.approx(min(before, 0.001))
    assert sys.getswitchinterval() == pytest.approx(before)


if __name__ == "__main__":
    main()
