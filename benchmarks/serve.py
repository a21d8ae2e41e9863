"""Serving throughput and latency: dapeng's dynamic batching against no batching, LitServe
and the Pipeline called in-process, all in one run on the same model and inputs.

    python benchmarks/serve.py                  # full run: classifier (minutes), then LLM (~20 min on busy cores)
    python benchmarks/serve.py --quick          # small version for CI
    python benchmarks/serve.py --section llm    # only the LLM section

The model is the text classifier of `examples/rotten-tomatoes-bilstm.yaml` (a bidirectional
LSTM over GloVe-50 word vectors, ~1.1M parameters: the most accurate of the classification
examples, 78.9% test over 3 seeds), built as `dapeng train` builds it (word tokenizer learned
on the Rotten Tomatoes training split) and cached under $DAPENG_HOME/bench. Its weights are
not trained: throughput does not depend on them.
`--example transformer|cnn` serves another classification example's model, `--encoder-10m` a
~10M-parameter encoder of the same layout (hidden 256, 6 layers), `--model RUN_OR_ARTIFACT`
a trained one. Requests are real review snippets from the test split, one per request
(`{"instances": [text]}`).

A server batches well only where the model does: `results.in_process_batch_gain` is what
batching buys the model itself (in-process items/s at the batch size the server formed ÷
at batch 1). Where the model is the bottleneck, batched ÷ unbatched serving can't exceed
it by much: on an AVX2 CPU in fp32 the 10M encoder is compute-bound already at batch 1
(gain ~2–3×, so batched ÷ unbatched stays near 2 whatever the server does). The examples'
small models gain more (~3–6×); there HTTP — client and servers share the cores — keeps
every server below the in-process rate, and the unbatched server pays it once per item.

The LLM section (`results.llm`, `ratios.llm_*`) serves a causal LM (the built-in
`smollm2-135m`; `--quick` a tiny random one, `--llm-model` another) and sends it 8 and 32
concurrent `completions.create(max_tokens=32, temperature=0)` requests with the official
`openai` client (`AsyncOpenAI`), each level's prompts all at once: to dapeng with continuous
batching (`batched`), to the same server with batching off (`--max-batch-size 1`,
`sequential`), and `Pipeline.generate` of the same prompts one after another in this process
(`in_process`); `in_process_batch` is the model's own `generate` of them as one left-padded
batch, the bound batching aims at. tokens_per_s counts completion tokens (the servers' `usage`;
in-process the same prompts' counts, the texts being checked equal). `same_text` counts the prompts whose
greedy text was the same batched as sequential and as in-process; `decode` is the batched
server's own account (from its metrics) of its decoding steps: mean sequences per step, mean
step time, and the share of the wall time spent in steps (the rest: HTTP, detokenizing,
waiting).

Each server runs in its own process on loopback; this process is the client: aiohttp,
`concurrency` coroutines sharing one connection pool, a fixed number of requests per
level and a time limit. Every server and the in-process baseline get the same torch
thread count. Only the system being measured runs: the other servers are paused
(SIGSTOP), since an idle LitServe polls its queues. Last line: one JSON object
{"results", "ratios", "env"}; ratios are dapeng (batched) ÷ baseline, so above 1 means
dapeng is better.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVELS = (1, 8, 64)
MAX_BATCH = 32


# -- the model ------------------------------------------------------------------------------


def build_model(threads: int) -> Path:
    """A ~10M-parameter Transformer text classifier (the examples' layout, wider and deeper) as an Artifact (cached)."""
    import torch

    from dapeng.config import DataConfig
    from dapeng.data import load_splits
    from dapeng.hub.artifact import save_artifact
    from dapeng.hub.store import dapeng_home
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    path = dapeng_home() / "bench" / "serve-transformer-10m"
    if (path / "dapeng.json").is_file():
        return path
    torch.set_num_threads(threads)
    splits = load_splits(DataConfig(dataset="rotten-tomatoes"))
    task = TASKS.create("text-classification", tokenizer="word", vocab_size=20000, max_length=128)
    task.setup(splits.train)
    kwargs = {**task.model_kwargs(), "hidden": 256, "layers": 6, "heads": 4, "intermediate": 1024,
              "max_positions": 128, "pooling": "mean"}
    torch.manual_seed(0)
    model = MODELS.create("transformer", **kwargs)
    card = {"summary": "Untrained weights: a stand-in for serving benchmarks only.",
            "data": "Word tokenizer learned on the Rotten Tomatoes training split (canonical split)."}
    return save_artifact(path, model=model, model_name="transformer", model_kwargs=kwargs,
                         task_name="text-classification", task_state=task.state(), card=card)


def build_example(name: str, threads: int) -> Path:
    """The model of `examples/rotten-tomatoes-NAME.yaml`, as `dapeng train` builds it, untrained (cached)."""
    import torch

    from dapeng.config import load_config
    from dapeng.data import load_splits
    from dapeng.hub.artifact import save_artifact
    from dapeng.hub.store import dapeng_home
    from dapeng.runner import build_task_and_model

    path = dapeng_home() / "bench" / f"serve-example-{name}"
    if (path / "dapeng.json").is_file():
        return path
    torch.set_num_threads(threads)
    config = load_config(Path(__file__).resolve().parent.parent / "examples" / f"rotten-tomatoes-{name}.yaml")
    torch.manual_seed(config.train.seed)
    task, model, kwargs = build_task_and_model(config, load_splits(config.data).train)
    card = {"summary": f"examples/rotten-tomatoes-{name}.yaml, untrained: a stand-in for serving benchmarks only."}
    return save_artifact(path, model=model, model_name=config.model.name, model_kwargs=kwargs,
                         task_name=config.task, task_state=task.state(), card=card)


def test_texts(limit: int) -> list[str]:
    from dapeng.config import DataConfig
    from dapeng.data import load_splits

    splits = load_splits(DataConfig(dataset="rotten-tomatoes"))
    records = splits.test or splits.eval
    return [r["text"] for r in records][:limit]


# -- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], port: int, env: dict[str, str], log: Path):
    """Start a server process and wait until it answers on `port`; stop it afterwards."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=out, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early: {' '.join(command)}; see {log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: see {log}") from None
                time.sleep(0.2)
        yield proc
    finally:
        # The whole process group: LitServe starts worker processes of its own.
        try:
            os.killpg(proc.pid, signal.SIGCONT)  # a paused server could not act on SIGINT
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def dapeng_command(model: Path, port: int, threads: int, max_batch: int) -> list[str]:
    return [sys.executable, "-m", "dapeng", "serve", f"bench={model}", "--port", str(port),
            "--threads", str(threads), "--max-batch-size", str(max_batch), "--log-level", "warning",
            "--max-queue", "4096"]


def litserve_command(model: Path, port: int, threads: int, batch_timeout: float) -> list[str]:
    return [sys.executable, __file__, "--litserve-worker", str(model), "--port", str(port),
            "--threads", str(threads), "--batch-timeout", str(batch_timeout)]


def run_litserve(model: str, port: int, threads: int, batch_timeout: float) -> None:
    """LitServe serving the same Pipeline, batching with its own batcher (max batch 32)."""
    import litserve as ls

    api = _litserve_api()(model, threads, max_batch_size=MAX_BATCH, batch_timeout=batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


def _litserve_api() -> type:
    """The LitAPI class; defined at module level (LitServe pickles it into its worker process)."""
    global PipelineAPI
    if "PipelineAPI" in globals():
        return PipelineAPI
    import litserve as ls

    class PipelineAPI(ls.LitAPI):  # type: ignore[no-redef]
        def __init__(self, model: str, threads: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.model_path, self.threads = model, threads

        def setup(self, device: str) -> None:
            import torch

            import dapeng

            torch.set_num_threads(self.threads)
            self.pipeline = dapeng.load(self.model_path)

        def decode_request(self, request):  # noqa: ANN001 (LitServe reads the annotation: leave it off)
            return request["instances"][0]

        def batch(self, inputs: list[str]) -> list[str]:
            return list(inputs)

        def predict(self, texts: list[str]) -> list[Any]:
            return self.pipeline.predict(texts, batch_size=len(texts))

        def unbatch(self, outputs: list[Any]) -> list[Any]:
            return list(outputs)

        def encode_response(self, output: Any) -> dict[str, Any]:
            return {"predictions": [output]}

    PipelineAPI.__qualname__ = "PipelineAPI"
    return PipelineAPI


if __name__ == "__mp_main__":  # LitServe's spawned worker unpickles the class from here
    _litserve_api()


# -- the load generator ---------------------------------------------------------------------


class Tally:
    """Completed requests, errors, busy seconds and latencies of one system at one level."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.seconds = 0.0
        self.items = 0.0
        self.batches = 0.0

    def row(self) -> dict[str, Any]:
        latencies = sorted(self.latencies)
        row = {
            "requests": len(latencies),
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "rps": round(len(latencies) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(1000 * _quantile(latencies, 0.50), 2),
            "p99_ms": round(1000 * _quantile(latencies, 0.99), 2),
        }
        if self.batches:
            row["mean_batch"] = round(self.items / self.batches, 2)
        return row


async def load(url: str, texts: list[str], concurrency: int, requests: int, time_limit: float, tally: Tally) -> None:
    """`requests` POSTs (or as many as fit in `time_limit` s) from `concurrency` clients."""
    import aiohttp

    issued = 0
    start = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() - start < time_limit:
            text = texts[issued % len(texts)]
            issued += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, json={"instances": [text]}) as response:
                    body = await response.read()
                    ok = response.status == 200 and b"predictions" in body
            except aiohttp.ClientError:
                ok = False
            if ok:
                tally.latencies.append(time.perf_counter() - t0)
            else:
                tally.errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    tally.seconds += time.perf_counter() - start


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def batch_stats(base: str) -> tuple[float, float]:
    """(batches, items) the dapeng server has run so far, from its Prometheus metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("dapeng_batch_size_count", "dapeng_batch_size_sum")):
            name, value = line.split(" ")
            values[name.split("{")[0]] = float(value)
    return values.get("dapeng_batch_size_count", 0.0), values.get("dapeng_batch_size_sum", 0.0)


@dataclass
class Server:
    """A server under test: its base URL, the path to POST to, and its process."""

    base: str
    path: str
    proc: subprocess.Popen

    def pause(self, paused: bool) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) the server's whole process group."""
        os.killpg(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)


def only(servers: dict[str, Server], name: str | None) -> None:
    """Let server `name` run and pause every other one (None pauses them all).

    An idle server is not always idle: LitServe's processes poll their queues and took
    ~20% of a core here with no traffic. Paused, they take nothing from the one measured.
    """
    for other, server in servers.items():
        if other != name:
            server.pause(True)
    if name in servers:
        servers[name].pause(False)


def measure(servers: dict[str, Server], pipeline: Any, texts: list[str], plan: dict[int, int],
            args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every system at every level, interleaved in `args.rounds` rounds.

    The machine's other load drifts; running the systems in turn, round after round, and
    starting each round one system later than the last, spreads that drift evenly over
    them instead of handing it to whichever runs in a fixed place. Only the system being
    measured runs: the servers not under load are paused.
    """
    systems = [*servers, "in_process"]
    tallies = {name: {c: Tally() for c in plan} for name in systems}
    for name, server in servers.items():
        only(servers, name)
        asyncio.run(load(server.base + server.path, texts, 8, args.warmup, args.time_limit, Tally()))
    for concurrency, requests in plan.items():
        batched = tallies["dapeng_batched"][concurrency]
        for round_ in range(args.rounds):
            for name in systems[round_ % len(systems):] + systems[:round_ % len(systems)]:
                only(servers, name)
                tally = tallies[name][concurrency]
                if name == "in_process":
                    # The batch size the batched server formed at this level (so far; 1 before any).
                    in_process(pipeline, texts, batched.items / batched.batches if batched.batches else 1.0,
                               requests // args.rounds, args.time_limit / args.rounds, tally)
                    continue
                server = servers[name]
                before = batch_stats(server.base) if name.startswith("dapeng") else None
                asyncio.run(load(server.base + server.path, texts, concurrency, requests // args.rounds,
                                 args.time_limit / args.rounds, tally))
                if before is not None:
                    batches, items = (a - b for a, b in zip(batch_stats(server.base), before))
                    tally.batches += batches
                    tally.items += items
        for name in tallies:
            print(f"{name:18s} c={concurrency:<3d} {tallies[name][concurrency].row()}", file=sys.stderr, flush=True)
    only(servers, None)
    results = {name: {f"c{c}": t.row() for c, t in levels.items()} for name, levels in tallies.items()}
    for c in plan:  # the in-process baseline counts items, and ran batches of this size
        row = results["in_process"][f"c{c}"]
        row["items_per_s"] = row.pop("rps")
        row["batch_size"] = max(1, round(tallies["dapeng_batched"][c].items / max(tallies["dapeng_batched"][c].batches, 1)))
        for key in ("p50_ms", "p99_ms", "errors"):
            row.pop(key)
    return results


def in_process(pipeline: Any, texts: list[str], mean_batch: float, items: int, time_limit: float,
               tally: Tally) -> None:
    """The Pipeline called directly with batches of the size the batched server formed."""
    size = max(1, round(mean_batch))
    start = time.perf_counter()
    done = 0
    while done < items and time.perf_counter() - start < time_limit:
        pipeline.predict([texts[(done + j) % len(texts)] for j in range(size)], batch_size=size)
        done += size
    tally.seconds += time.perf_counter() - start
    tally.latencies.extend([0.0] * done)  # items, counted like requests


# -- the LLM section ------------------------------------------------------------------------

LLM_LEVELS = (8, 32)
LLM_MAX_TOKENS = 32
LLM_PROMPT_CHARS = 160  # review openings: prompts of different lengths, a few dozen tokens each


def build_tiny_lm(threads: int) -> Path:
    """A small random causal LM (2 layers, hidden 64, BPE learned on the reviews) as an Artifact (cached), for --quick."""
    import torch

    from dapeng.config import DataConfig
    from dapeng.data import load_splits
    from dapeng.hub.artifact import save_artifact
    from dapeng.hub.store import dapeng_home
    from dapeng.models import MODELS
    from dapeng.tasks import TASKS

    path = dapeng_home() / "bench" / "serve-tiny-lm"
    if (path / "dapeng.json").is_file():
        return path
    torch.set_num_threads(threads)
    task = TASKS.create("causal-lm", vocab_size=2000, block_size=64, max_length=256)
    task.setup(load_splits(DataConfig(dataset="rotten-tomatoes")).train[:2000])
    kwargs = {**task.model_kwargs(), "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
              "max_positions": 256}
    torch.manual_seed(0)
    model = MODELS.create("lm", **kwargs)
    card = {"summary": "Untrained weights: a stand-in for serving benchmarks only."}
    return save_artifact(path, model=model, model_name="lm", model_kwargs=kwargs, task_name="causal-lm",
                         task_state=task.state(), card=card)


def llm_command(model: str, port: int, threads: int, max_batch: int) -> list[str]:
    # A generous time limit: the last of 32 requests to the unbatched server waits for the other 31.
    return [sys.executable, "-m", "dapeng", "serve", f"bench={model}", "--port", str(port), "--threads",
            str(threads), "--max-batch-size", str(max_batch), "--log-level", "warning", "--timeout", "900"]


def decode_stats(base: str) -> dict[str, float]:
    """Sums and counts of the dapeng server's decode-step metrics so far."""
    import urllib.request

    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    names = ("dapeng_decode_step_seconds_sum", "dapeng_decode_step_seconds_count", "dapeng_decode_batch_size_sum")
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in values:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


async def complete_all(base: str, prompts: list[str]) -> tuple[float, list[str], list[int]]:
    """All `prompts` sent at once through the official client: (wall seconds, texts, completion tokens)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=900) as client:

        async def one(prompt: str) -> Any:
            return await client.completions.create(model="bench", prompt=prompt, max_tokens=LLM_MAX_TOKENS,
                                                   temperature=0)

        start = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
    return wall, [a.choices[0].text for a in answers], [a.usage.completion_tokens for a in answers]


def generate_all(pipeline: Any, prompts: list[str]) -> tuple[float, list[str]]:
    """`Pipeline.generate` of `prompts`, one after another: (wall seconds, texts)."""
    start = time.perf_counter()
    texts = [pipeline.generate(p, max_new_tokens=LLM_MAX_TOKENS, temperature=0.0) for p in prompts]
    return time.perf_counter() - start, texts


def generate_batch(pipeline: Any, prompts: list[str]) -> float:
    """The model's own batched `generate` of `prompts` (left-padded, greedy): wall seconds.

    The bound a server's batching aims at: one padded batch from start to end, no joins, no HTTP.
    """
    import torch

    task, model = pipeline.task, pipeline.model
    ids = [task.prompt_ids(p) for p in prompts]
    width = max(len(i) for i in ids)
    batch = torch.full((len(ids), width), task.pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, prompt in enumerate(ids):
        batch[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    start = time.perf_counter()
    model.generate(batch, max_new_tokens=LLM_MAX_TOKENS, temperature=0.0, stop_ids=task.stop_ids or (),
                   attention_mask=mask)
    return time.perf_counter() - start


def measure_llm(servers: dict[str, Server], pipeline: Any, prompts: list[str], rounds: int) -> dict[str, Any]:
    """Each system at each level, `rounds` times, interleaved as in `measure`; only the measured one runs."""
    systems = [*servers, "in_process", "in_process_batch"]
    for name, server in servers.items():  # warm-up: first-call costs out of the way
        only(servers, name)
        asyncio.run(complete_all(server.base, prompts[:2]))
    generate_all(pipeline, prompts[:1])
    results: dict[str, Any] = {}
    for c in LLM_LEVELS:
        batch = prompts[:c]
        wall = dict.fromkeys(systems, 0.0)
        texts: dict[str, list[str]] = {}
        tokens: dict[str, list[int]] = {}
        decode = dict.fromkeys(("dapeng_decode_step_seconds_sum", "dapeng_decode_step_seconds_count",
                                "dapeng_decode_batch_size_sum"), 0.0)
        for round_ in range(rounds):
            for name in systems[round_ % len(systems):] + systems[:round_ % len(systems)]:
                only(servers, name)
                if name == "in_process":
                    seconds, texts[name] = generate_all(pipeline, batch)
                elif name == "in_process_batch":
                    seconds = generate_batch(pipeline, batch)
                else:
                    before = decode_stats(servers[name].base) if name == "batched" else None
                    seconds, texts[name], tokens[name] = asyncio.run(complete_all(servers[name].base, batch))
                    if before is not None:
                        after = decode_stats(servers[name].base)
                        for key in decode:
                            decode[key] += after[key] - before[key]
                wall[name] += seconds
        # Greedy decoding gives the in-process run the same tokens: it is counted with the server's usage.
        tokens["in_process"] = tokens["in_process_batch"] = tokens["sequential"]
        level: dict[str, Any] = {
            name: {"tokens_per_s": round(sum(tokens[name]) * rounds / wall[name], 2),
                   "wall_s": round(wall[name] / rounds, 3), "completion_tokens": sum(tokens[name])}
            for name in systems
        }
        level["same_text"] = {
            "of": c,
            "sequential": sum(a == b for a, b in zip(texts["batched"], texts["sequential"])),
            "in_process": sum(a == b for a, b in zip(texts["batched"], texts["in_process"])),
        }
        steps = decode["dapeng_decode_step_seconds_count"]
        level["decode"] = {
            "steps": int(steps / rounds),
            "mean_batch": round(decode["dapeng_decode_batch_size_sum"] / steps, 2) if steps else 0.0,
            "mean_step_ms": round(1000 * decode["dapeng_decode_step_seconds_sum"] / steps, 2) if steps else 0.0,
            "step_share_of_wall": round(decode["dapeng_decode_step_seconds_sum"] / wall["batched"], 3),
        }
        results[f"c{c}"] = level
        print(f"llm c={c:<3d} {level}", file=sys.stderr, flush=True)
    only(servers, None)
    return results


def llm_section(args: argparse.Namespace, threads: int, env: dict[str, str]) -> tuple[dict, dict, dict]:
    """The LLM servers against each other and in-process generation: (results, ratios, env)."""
    import openai
    import torch

    import dapeng

    model = args.llm_model or (str(build_tiny_lm(threads)) if args.quick else "smollm2-135m")
    prompts = [t[:LLM_PROMPT_CHARS] for t in test_texts(max(LLM_LEVELS))]
    torch.set_num_threads(threads)
    pipeline = dapeng.load(model)
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, max_batch in (("batched", MAX_BATCH), ("sequential", 1)):
            port = free_port()
            proc = stack.enter_context(running(llm_command(model, port, threads, max_batch), port, env,
                                               args.log_dir / f"llm_{name}.log"))
            servers[name] = Server(f"http://127.0.0.1:{port}", "/v1/completions", proc)
        results = measure_llm(servers, pipeline, prompts, args.llm_rounds)
    ratios = {}
    for c in LLM_LEVELS:
        level = results[f"c{c}"]
        for other in ("sequential", "in_process", "in_process_batch"):
            ratios[f"llm_batched_vs_{other}_c{c}"] = round(
                level["batched"]["tokens_per_s"] / level[other]["tokens_per_s"], 3)
    info = {
        "model": {"name": pipeline.meta.get("model", {}).get("name"), "source": model,
                  "params": sum(p.numel() for p in pipeline.model.parameters())},
        "precision": pipeline.precision,
        "max_batch_size": MAX_BATCH,
        "max_tokens": LLM_MAX_TOKENS,
        "prompt_chars": LLM_PROMPT_CHARS,
        "client": f"openai {openai.__version__} AsyncOpenAI, all of a level's requests at once",
        "rounds": args.llm_rounds,
    }
    return results, ratios, info


def machine(threads: int, load_at_start: list[float]) -> dict[str, Any]:
    """The software and hardware a run measured on, and the machine's other load."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {
        "torch": torch.__version__,
        "threads": threads,
        "cpu": cpu,
        "cores": os.cpu_count(),
        # 1, 5 and 15-minute load averages when the run started and ended: the other work on the machine.
        "load_average_start": load_at_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def environment(pipeline: Any, model: Path, threads: int, args: argparse.Namespace,
                load_at_start: list[float]) -> dict[str, Any]:
    return {
        **machine(threads, load_at_start),
        "precision": pipeline.precision,
        "model": {"name": pipeline.meta.get("model", {}).get("name"), "params": sum(p.numel() for p in pipeline.model.parameters()),
                  "path": str(model)},
        "max_batch_size": MAX_BATCH,
        "litserve_batch_timeout_s": args.litserve_batch_timeout,
        "client": "aiohttp, one process, one request per item",
        "rounds": args.rounds,
        "quick": args.quick,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small version for CI")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--example", choices=("transformer", "cnn", "bilstm"), default="bilstm",
                        help="serve the model of examples/rotten-tomatoes-EXAMPLE.yaml, untrained (default bilstm)")
    source.add_argument("--encoder-10m", action="store_true",
                        help="serve a ~10M-parameter encoder (hidden 256, 6 layers) instead of an example's model")
    source.add_argument("--model", type=Path, help="serve this run/Artifact instead")
    parser.add_argument("--section", choices=("all", "classifier", "llm"), default="all",
                        help="which part to run (default all: the classifier, then the LLM)")
    parser.add_argument("--llm-model", help="LLM to serve: hub name or Artifact (default smollm2-135m; quick: a tiny one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: half the cores)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds per system and level (default 40, quick 20)")
    parser.add_argument("--litserve-batch-timeout", type=float, default=0.005)
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dapeng-bench-serve")
    parser.add_argument("--litserve-worker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-timeout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    if args.litserve_worker:
        run_litserve(args.litserve_worker, args.port, threads, args.batch_timeout)
        return
    args.time_limit = args.time_limit or (20.0 if args.quick else 40.0)
    args.rounds = 2 if args.quick else 8  # short interleaved slices: the other load drifts over seconds
    args.warmup = 64 if args.quick else 200
    args.llm_rounds = 1 if args.quick else 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    plan = {1: 150, 8: 400, 64: 800} if args.quick else {1: 1000, 8: 2000, 64: 4000}

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    # The same threads everywhere, this process (the in-process baseline) included: left on,
    # the tokenizer encodes a batch on every core, and the baseline would use two cores to the
    # servers' one (its thread waited ~13% of the time for those helpers).
    os.environ.update({"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    env = dict(os.environ)
    results: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    report = machine(threads, load_at_start)
    if args.section in ("all", "classifier"):
        results, ratios, report = classifier_section(args, threads, env, plan, load_at_start)
    if args.section in ("all", "llm"):
        results["llm"], llm_ratios, report["llm"] = llm_section(args, threads, env)
        ratios.update(llm_ratios)
        report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({"results": results, "ratios": ratios, "env": report}))


def classifier_section(args: argparse.Namespace, threads: int, env: dict[str, str], plan: dict[int, int],
                       load_at_start: list[float]) -> tuple[dict, dict, dict]:
    """The classifier servers, LitServe and in-process predict: (results, ratios, env)."""
    model = args.model or (build_model(threads) if args.encoder_10m else build_example(args.example, threads))
    texts = test_texts(2000)
    commands = {
        "dapeng_batched": (lambda port: dapeng_command(model, port, threads, MAX_BATCH), "/v1/models/bench:predict"),
        "dapeng_unbatched": (lambda port: dapeng_command(model, port, threads, 1), "/v1/models/bench:predict"),
        "litserve": (lambda port: litserve_command(model, port, threads, args.litserve_batch_timeout), "/predict"),
    }
    import torch

    import dapeng

    torch.set_num_threads(threads)
    pipeline = dapeng.load(model)
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, (command, path) in commands.items():
            port = free_port()
            proc = stack.enter_context(running(command(port), port, env, args.log_dir / f"{name}.log"))
            servers[name] = Server(f"http://127.0.0.1:{port}", path, proc)
        results = measure(servers, pipeline, texts, plan, args)

    def rps(system: str, c: int) -> float:
        return results[system][f"c{c}"]["rps"]

    ratios = {}
    for c in LEVELS:
        ratios[f"batched_vs_unbatched_c{c}"] = round(rps("dapeng_batched", c) / rps("dapeng_unbatched", c), 3)
        ratios[f"batched_vs_litserve_c{c}"] = round(rps("dapeng_batched", c) / rps("litserve", c), 3)
        ratios[f"batched_vs_in_process_c{c}"] = round(
            rps("dapeng_batched", c) / results["in_process"][f"c{c}"]["items_per_s"], 3)
    # What batching buys this model at all: in-process items/s at the level's batch size ÷ at batch 1.
    # Batched ÷ unbatched serving can't exceed it by much, however lean the server.
    base = results["in_process"]["c1"]["items_per_s"]
    results["in_process_batch_gain"] = {
        f"c{c}": round(results["in_process"][f"c{c}"]["items_per_s"] / base, 3) for c in LEVELS if c != 1}
    return results, ratios, environment(pipeline, model, threads, args, load_at_start)


if __name__ == "__main__":
    main()
