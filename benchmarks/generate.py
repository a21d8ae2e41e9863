"""SmolLM2-135M generation speed: dapeng's `lm` against Hugging Face `transformers` `generate`, same weights.

Both models hold the same dequantized GGUF weights (dapeng's from the hub, transformers'
from its own GGUF loader), in the same dtype, on the same number of threads, in one process.
For every configuration (dtype × batch × prompt length) the two are timed alternately, so
load from other processes hits both alike, and the fastest of `--repeats` runs counts
(the least disturbed one):

* prefill tokens/s: batch × prompt / time to produce the first token;
* decode tokens/s: batch × (N − 1) / (time for N new tokens − time for 1).

`results.decode_fraction_of_bandwidth` compares dapeng's fp32 batch-1 decode with the memory
bandwidth measured in the same run (one thread summing a 512 MB tensor): every decode step
reads all weights once, so weight bytes × steps/s ÷ bandwidth is the fraction reached.

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
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

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


def timer(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(ours: torch.nn.Module, ref: torch.nn.Module, pad_id: int, batch: int, prompt: int, new: int,
            repeats: int) -> dict[str, float | None]:
    """Best-of-`repeats` prefill and decode tokens/s for both, run alternately."""
    ids = torch.randint(200, 40000, (batch, prompt), generator=torch.Generator().manual_seed(batch * 1000 + prompt))
    mask = torch.ones_like(ids)

    def dapeng_run(n: int) -> None:
        ours.generate(ids, max_new_tokens=n, temperature=0.0)

    @torch.inference_mode()
    def hf_run(n: int) -> None:
        ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                     pad_token_id=pad_id)

    dapeng_run(2)  # warm-up: allocator, kernels
    hf_run(2)
    best: dict[str, float] = {"d1": float("inf"), "dn": float("inf"), "h1": float("inf"), "hn": float("inf")}
    for _ in range(repeats):
        best["d1"] = min(best["d1"], timer(lambda: dapeng_run(1)))
        best["h1"] = min(best["h1"], timer(lambda: hf_run(1)))
        best["dn"] = min(best["dn"], timer(lambda: dapeng_run(new)))
        best["hn"] = min(best["hn"], timer(lambda: hf_run(new)))
    steps = batch * (new - 1)

    def decode_rate(total: float, first: float) -> float | None:
        # Under heavy outside load a long run can beat a short one: no valid figure then.
        return steps / (total - first) if total > first * 1.05 else None

    return {
        "dapeng_prefill_tok_s": batch * prompt / best["d1"],
        "transformers_prefill_tok_s": batch * prompt / best["h1"],
        "dapeng_decode_tok_s": decode_rate(best["dn"], best["d1"]),
        "transformers_decode_tok_s": decode_rate(best["hn"], best["h1"]),
    }


def read_bandwidth_gb_s() -> float:
    """Single-thread memory read bandwidth: best of 5 sums over a 512 MB tensor."""
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    best = min(timer(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best / 1e9


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
    ours32, ref32, pad_id = load_models()
    results: dict[str, Any] = {"configs": {}}
    ratios: dict[str, dict[str, float | None]] = {"decode_vs_transformers": {}, "prefill_vs_transformers": {}}
    for dtype in args.dtypes:
        ours, ref = ours32.to(DTYPES[dtype]), ref32.to(DTYPES[dtype])
        for batch in args.batches:
            for prompt in args.prompts:
                key = f"{dtype}_b{batch}_p{prompt}"
                log(f"{key}: measuring")
                r = measure(ours, ref, pad_id, batch, prompt, args.new_tokens, args.repeats)
                results["configs"][key] = r
                valid = r["dapeng_decode_tok_s"] and r["transformers_decode_tok_s"]
                ratios["decode_vs_transformers"][key] = (
                    r["dapeng_decode_tok_s"] / r["transformers_decode_tok_s"] if valid else None
                )
                ratios["prefill_vs_transformers"][key] = r["dapeng_prefill_tok_s"] / r["transformers_prefill_tok_s"]
                log(f"{key}: {json.dumps(r)}")
    ours32.float()
    bandwidth = read_bandwidth_gb_s()
    weight_bytes = sum(p.numel() * 4 for p in ours32.parameters())
    first = results["configs"].get("fp32_b1_p32") or next(iter(results["configs"].values()))
    results["read_bandwidth_gb_s"] = bandwidth
    results["weight_bytes_fp32"] = weight_bytes
    rate = first["dapeng_decode_tok_s"]
    results["decode_fraction_of_bandwidth"] = weight_bytes * rate / (bandwidth * 1e9) if rate else None
    env = {
        "threads": torch.get_num_threads(),
        "precision": args.dtypes,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_average": os.getloadavg()[0],
        "note": "shared 2-core machine; both sides timed alternately, best of repeats",
    }
    print(json.dumps({"results": results, "ratios": ratios, "env": env}))


if __name__ == "__main__":
    main()
