"""SmolLM2-135M generation speed: dapeng's `lm` against Hugging Face `transformers` `generate`, same weights.

Both models hold the same dequantized GGUF weights (dapeng's from the hub, transformers'
from its own GGUF loader), in the same dtype, on the same number of threads, in one process.
For every configuration (dtype × batch × prompt length) the two are timed alternately, so
load from other processes hits both alike, and the fastest of `--repeats` runs counts
(the least disturbed one):

* prefill tokens/s: batch × prompt / time to produce the first token (best run);
* decode tokens/s: batch / the median time of one decoding step (both sides stream their
  tokens, so every step is timed on its own; a step slowed by outside load doesn't move the median).

With one torch thread (the default) the clock is this process's CPU time, so time another
process holds the core counts for neither side.

Every decode step of one sequence reads all weights once, so weight bytes × steps/s ÷ memory
bandwidth is the fraction of the bandwidth that batch-1 decoding (prompt 32) reaches. Two
bandwidths are measured in the same run, by summing a 512 MB tensor (best of 5):
`results.read_bandwidth_gb_s` with one thread (one sequential stream, the clock above) and
`results.multi_stream_read_bandwidth_gb_s` with one thread per core (`bandwidth_streams`
contiguous streams at once, wall time). `results.decode_fraction_of_bandwidth_by_dtype` is each
dtype's fraction of the multi-stream bandwidth (bf16 weights are half the bytes);
`results.decode_fraction_of_bandwidth` stays fp32's fraction of the one-thread bandwidth.
`env.cpu_kernel_path` names the path of dapeng's CPU kernel that ran (avx2, avx512f or
avx512bf16; null without the kernel).

    python benchmarks/generate.py                  # all 8 configurations per dtype (slow with bf16 on CPUs without it)
    python benchmarks/generate.py --quick          # batch 1, prompt 32, 8 new tokens
    python benchmarks/generate.py --dtypes fp32 --batches 1 8 --prompts 32 512

The last line of stdout is one JSON object (results, ratios, env).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from dapeng.layers import cpu_matmul

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(f"[generate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_models() -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(dapeng lm, transformers LlamaForCausalLM, pad id), both fp32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from dapeng.hub.artifact import load_artifact
    from dapeng.hub.builtin import fetch_files
    from dapeng.hub.store import dapeng_home, resolve

    started = time.perf_counter()
    artifact = load_artifact(resolve("smollm2-135m"), precision="fp32")
    log(f"dapeng model loaded in {time.perf_counter() - started:.1f}s")
    folder = fetch_files("smollm2-135m", dapeng_home() / "downloads")
    started = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=next(folder.glob("*.gguf")).name,
                                               dtype=torch.float32).eval()
    log(f"transformers model loaded in {time.perf_counter() - started:.1f}s")
    return artifact.model.eval(), ref, int(artifact.meta["preprocess"]["pad_id"])


def clock(threads: int) -> Callable[[], float]:
    """This process's CPU time with one torch thread, else wall time.

    With one thread, CPU time is the time the work took on a core that it had to itself:
    while another process holds the core, neither side's clock runs, which removes most of
    the noise of a shared machine (cache and memory-bandwidth contention remain).
    """
    return time.process_time if threads == 1 else time.perf_counter


class StepTimes:
    """A transformers streamer that records the clock at the prompt and at every new token."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now, self.marks = now, []

    def put(self, value: Any) -> None:
        self.marks.append(self.now())

    def end(self) -> None:
        pass


def rates(start: float, marks: list[float], batch: int, prompt: int) -> tuple[float, list[float]]:
    """(prefill tokens/s, per-step decode seconds) from the clock at the start and at each new token."""
    return batch * prompt / (marks[0] - start), [b - a for a, b in zip(marks, marks[1:])]


def measure(ours: torch.nn.Module, ref: torch.nn.Module, pad_id: int, batch: int, prompt: int, new: int,
            repeats: int, now: Callable[[], float]) -> dict[str, float | None]:
    """Prefill and decode tokens/s for both, run alternately.

    Both generate `new` tokens per run, streaming, so each step is timed on its own: prefill is
    the time to the first new token (best run counts), decode is batch ÷ the median step time
    over all runs (a step slowed by outside load doesn't move the median).
    """
    gen = torch.Generator().manual_seed(batch * 1000 + prompt)
    ids = torch.randint(200, 40000, (batch, prompt), generator=gen)

    def dapeng_run(prompt_ids: torch.Tensor, n: int) -> tuple[float, list[float]]:
        start = now()
        marks = [now() for _ in ours.generate(prompt_ids, max_new_tokens=n, temperature=0.0, stream=True)]
        return start, marks

    @torch.inference_mode()
    def hf_run(prompt_ids: torch.Tensor, n: int) -> tuple[float, list[float]]:
        streamer = StepTimes(now)
        start = now()
        ref.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n, do_sample=False,
                     eos_token_id=None, pad_token_id=pad_id, streamer=streamer)
        return start, streamer.marks[1:]  # the first put is the prompt itself

    # warm-up (allocator, kernels) on a short prompt: a long bf16 prefill costs minutes on CPUs without bf16
    dapeng_run(ids[:, :32], 3)
    hf_run(ids[:, :32], 3)
    prefill: dict[str, float] = {"dapeng": 0.0, "transformers": 0.0}
    steps: dict[str, list[float]] = {"dapeng": [], "transformers": []}
    for _ in range(repeats):
        for side, run in (("dapeng", dapeng_run), ("transformers", hf_run)):
            start, marks = run(ids, new)
            if len(marks) != new:
                raise RuntimeError(f"{side} produced {len(marks)} tokens, expected {new}")
            rate, step_s = rates(start, marks, batch, prompt)
            prefill[side] = max(prefill[side], rate)
            steps[side] += step_s
    out: dict[str, float | None] = {}
    for side in ("dapeng", "transformers"):
        out[f"{side}_prefill_tok_s"] = prefill[side]
        out[f"{side}_decode_tok_s"] = batch / statistics.median(steps[side])
    return out


def read_bandwidth_gb_s(now: Callable[[], float], streams: int = 1) -> float:
    """Memory read bandwidth: best of 5 sums over a 512 MB tensor by `streams` torch threads.

    Each thread sums its own contiguous part, so `streams` sequential streams run at once
    (several streams keep more memory requests in flight than one core's single stream can).
    """
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(streams)
    try:
        times = []
        for _ in range(5):
            start = now()
            x.sum()
            times.append(now() - start)
    finally:
        torch.set_num_threads(before)
    return x.numel() * 4 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, prompt 32, 8 new tokens, one repeat")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompts", nargs="+", type=int, default=[32, 512])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps other load from stalling sync)")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.prompts, args.new_tokens, args.repeats = [1], [32], 8, 1
    torch.set_num_threads(args.threads)
    now = clock(args.threads)
    from dapeng._hardware import native_bf16 as cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16("cpu")
    ours32, ref32, pad_id = load_models()
    results: dict[str, Any] = {"configs": {}}
    ratios: dict[str, dict[str, float | None]] = {"decode_vs_transformers": {}, "prefill_vs_transformers": {}}
    repeats_used: dict[str, int] = {}
    for dtype in args.dtypes:
        ours, ref = ours32.to(DTYPES[dtype]), ref32.to(DTYPES[dtype])
        for batch in args.batches:
            for prompt in args.prompts:
                key = f"{dtype}_b{batch}_p{prompt}"
                # transformers' bf16 prefill of 8 × 512 tokens takes minutes without native bf16: one run
                slow = dtype == "bf16" and not native_bf16 and batch * prompt >= 2048
                repeats_used[key] = 1 if slow else args.repeats
                log(f"{key}: measuring ({repeats_used[key]} run(s) of {args.new_tokens} new tokens per side)")
                started = time.perf_counter()
                r = measure(ours, ref, pad_id, batch, prompt, args.new_tokens, repeats_used[key], now)
                r["wall_s"] = round(time.perf_counter() - started, 1)
                results["configs"][key] = r
                ratios["decode_vs_transformers"][key] = r["dapeng_decode_tok_s"] / r["transformers_decode_tok_s"]
                ratios["prefill_vs_transformers"][key] = r["dapeng_prefill_tok_s"] / r["transformers_prefill_tok_s"]
                log(f"{key}: {json.dumps(r)}")
    ours32.float()
    bandwidth = read_bandwidth_gb_s(now)
    streams = len(os.sched_getaffinity(0))
    multi_bandwidth = read_bandwidth_gb_s(time.perf_counter, streams)  # CPU time would add up the threads'
    params = sum(p.numel() for p in ours32.parameters())
    results["read_bandwidth_gb_s"] = bandwidth
    results["multi_stream_read_bandwidth_gb_s"] = multi_bandwidth
    results["bandwidth_streams"] = streams
    results["weight_bytes"] = {"fp32": params * 4, "bf16": params * 2}
    # every decode step of one sequence reads all weights once: bytes/s ÷ bandwidth
    weight_bytes_per_s = {
        dtype: results["configs"][f"{dtype}_b1_p32"]["dapeng_decode_tok_s"] * results["weight_bytes"][dtype]
        for dtype in args.dtypes
        if f"{dtype}_b1_p32" in results["configs"]
    }
    results["decode_fraction_of_bandwidth"] = (
        weight_bytes_per_s["fp32"] / (bandwidth * 1e9) if "fp32" in weight_bytes_per_s else None
    )
    results["decode_fraction_of_bandwidth_by_dtype"] = {
        dtype: rate / (multi_bandwidth * 1e9) for dtype, rate in weight_bytes_per_s.items()
    }
    env = {
        "threads": torch.get_num_threads(),
        "timer": "process CPU time" if args.threads == 1 else "wall time",
        "precision": args.dtypes,
        "native_bf16": native_bf16,
        "cpu_kernel": cpu_matmul.available(),  # dapeng.layers.cpu_matmul; DAPENG_CPU_KERNELS=0 turns it off
        "cpu_kernel_path": cpu_matmul.kernel_path(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "new_tokens": args.new_tokens,
        "repeats": repeats_used,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "note": (
            "shared 2-core machine; both sides timed alternately in one process, each step on its own; "
            "prefill: best run, decode: median step. dapeng bf16 on a CPU without native bf16: weights stay "
            "bf16, activations/KV cache/attention fp32; products of a few rows read the bf16 weights in "
            "dapeng's CPU kernel (cpu_kernel: true; fp32 accumulation), larger ones upcast the weights. "
            "With native bf16 dapeng computes in bf16 and the kernel's avx512bf16 path multiplies bf16 "
            "activations by the bf16 weights (vdpbf16ps, fp32 accumulation). "
            "transformers runs bf16 throughout. Long bf16 configs measured with one run instead of several."
        ),
    }
    print(json.dumps({"results": results, "ratios": ratios, "env": env}))


if __name__ == "__main__":
    main()
