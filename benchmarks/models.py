"""Training throughput of dapeng's Transformer encoder and decoder LM against nanoGPT-style references.

    python benchmarks/models.py            # ~10M-parameter models, batch 32 × 128 tokens
    python benchmarks/models.py --quick    # tiny models, a few steps (CI)

In one run, on the same batches, precision and thread count:
* dapeng's `transformer` (BERT layout, sequence classification) against a hand-written
  nanoGPT-style encoder of the same size (fused qkv projection, SDPA, GELU MLP);
* dapeng's `lm` (Llama layout, `kv_heads = heads`) against the same architecture hand-written
  nanoGPT-style, as Karpathy's llama2.c `model.py` writes it (`decoder_vs_reference`), and
  against nanoGPT's GPT-2 of the same size (`decoder_vs_gpt2_reference`: LayerNorm, GELU MLP and
  learned positions do less element-wise work per token than RMSNorm, SwiGLU and RoPE);
* the machine's matmul peak (fp32 and bf16), to turn achieved FLOP/s into a fraction.

Steps of the two sides alternate and the median step time counts, so background load on a
shared machine affects both sides alike. FLOPs per step (forward + backward) come from
`torch.utils.flop_counter.FlopCounterMode`. Precision "auto" uses bf16 autocast only where
the CPU has native bf16 matmuls (oneDNN reports it), since emulated bf16 is far slower.

The last line of stdout is one JSON object: {"results": …, "ratios": …, "env": …};
ratios are dapeng tokens/s ÷ reference tokens/s (>1: dapeng is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dapeng.models import MODELS


class RefAttention(nn.Module):
    """nanoGPT's attention: one fused qkv projection and SDPA."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, causal: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads, causal)
        self.c_fc, self.c_proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefTransformer(nn.Module):
    """nanoGPT's GPT; `causal=False` and a mean-pooled classifier head make it an encoder."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, hidden: int, seq: int, causal: bool,
                 num_labels: int = 0) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(RefBlock(dim, heads, hidden, causal) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_labels) if num_labels else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.head is not None:
            return self.head(x.mean(dim=1))  # (B, K)
        return F.linear(x, self.wte.weight)  # (B, T, V), tied


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """llama2.c's RMSNorm, written as its formula."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class RefLlamaBlock(nn.Module):
    """A Llama block as Karpathy's llama2.c `model.py` writes it (nanoGPT's style, Llama's layout).

    RMSNorm as its formula, rotary positions by complex multiplication of adjacent pairs,
    separate q/k/v projections, SDPA, and SwiGLU `w2(silu(w1(x)) * w3(x))`.
    """

    def __init__(self, dim: int, heads: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.attention_norm, self.ffn_norm = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = rms_norm(x, self.attention_norm, self.eps)
        q, k, v = (w(h).view(b, t, self.heads, d // self.heads) for w in (self.wq, self.wk, self.wv))
        q, k = (torch.view_as_real(torch.view_as_complex(z.float().reshape(*z.shape[:-1], -1, 2)) * freqs_cis)
                .flatten(3).type_as(z) for z in (q, k))  # (B, T, H, Dh)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, d))
        h = rms_norm(x, self.ffn_norm, self.eps)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class RefLlama(nn.Module):
    """llama2.c's Transformer: the same architecture as dapeng's `lm`, hand-written nanoGPT-style."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, hidden: int, seq: int,
                 theta: float = 10000.0) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(RefLlamaBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        head_dim = dim // heads
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(seq).float(), freqs)  # (T, Dh/2)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles)[:, None, :], persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids)
        freqs_cis = self.freqs_cis[: ids.shape[1]]  # (T, 1, Dh/2)
        for layer in self.layers:
            x = layer(x, freqs_cis)
        x = rms_norm(x, self.norm)
        return F.linear(x, self.tok_embeddings.weight)  # (B, T, V), tied


def matmul_peak(dtype: torch.dtype, budget_s: float = 2.0, now: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of square matmuls in `dtype` (the best of a few sizes), within a time budget."""
    best = 0.0
    for n in (256, 512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        start = now()
        a @ b
        if now() - start > budget_s / 4:  # emulated dtype: don't wait for the big sizes
            best = max(best, 2 * n**3 / (now() - start))
            break
        reps, times = 0, []
        while reps < 3 or sum(times) < budget_s / 4:
            t0 = now()
            a @ b
            times.append(now() - t0)
            reps += 1
        best = max(best, 2 * n**3 / min(times))
    return best


def step_flops(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], autocast: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    # one context for both passes: entering a FlopCounterMode again clears what it counted
    with FlopCounterMode(display=False) as counter:
        with autocast():
            loss = loss_fn(model)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def race(
    sides: dict[str, tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]],
    steps: int,
    warmup: int,
    autocast: Any,
    now: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Alternate training steps of each side; return the median seconds per step (by the clock `now`)."""
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True) for k, (m, _) in sides.items()}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(warmup + steps):
        for name, (model, loss_fn) in sides.items():
            t0 = now()
            with autocast():
                loss = loss_fn(model)
            loss.backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(now() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps")
    # one thread by default: on shared cores a second OpenMP thread waits for a busy core at every op
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both sides before timing (nanoGPT's own default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # one thread: this process's CPU time, so time that another process holds the core counts for neither side
    now = time.process_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    from dapeng._hardware import native_bf16 as cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16("cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if native_bf16 else "fp32")

    def autocast() -> Any:
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if args.quick:
        vocab, dim, layers, heads, batch, seq, steps, warmup = 1024, 64, 2, 2, 4, 32, 3, 1
    else:
        vocab, dim, layers, heads, batch, seq, steps, warmup = 8192, 256, 10, 4, 32, 128, 7, 2
    steps = args.steps or steps
    labels = 2
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    y = torch.randint(0, labels, (batch,))

    encoder = MODELS.create("transformer", vocab_size=vocab, num_labels=labels, hidden=dim, layers=layers,
                            heads=heads, intermediate=4 * dim, max_positions=seq, dropout=0.0)
    ref_encoder = RefTransformer(vocab, dim, layers, heads, 4 * dim, seq, causal=False, num_labels=labels)
    # SwiGLU's three matrices hold about as many weights as a 4·dim GELU MLP at 8·dim/3, rounded
    # to a multiple of 16 as Llama rounds its width (odd widths make slow GEMMs)
    swiglu = 16 * round(8 * dim / 3 / 16)
    decoder = MODELS.create("lm", vocab_size=vocab, hidden=dim, layers=layers, heads=heads, kv_heads=heads,
                            intermediate=swiglu, max_positions=seq)
    ref_decoder = RefLlama(vocab, dim, layers, heads, swiglu, seq)
    gpt_decoder = RefTransformer(vocab, dim, layers, heads, 4 * dim, seq, causal=True)

    def classify(model: nn.Module) -> torch.Tensor:
        logits = model(ids, mask) if getattr(model, "_orig_mod", model) is encoder else model(ids)
        return F.cross_entropy(logits.float(), y)

    def next_token(model: nn.Module) -> torch.Tensor:
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))

    peaks = {"fp32": matmul_peak(torch.float32, now=now), "bf16": matmul_peak(torch.bfloat16, now=now)}
    results: dict[str, Any] = {"matmul_peak_gflops": {k: round(v / 1e9, 2) for k, v in peaks.items()}}
    ratios: dict[str, float] = {}
    for kind, ours, refs, loss_fn in (
        ("encoder", encoder, {"reference": ref_encoder}, classify),
        ("decoder", decoder, {"reference": ref_decoder, "gpt2_reference": gpt_decoder}, next_token),
    ):
        models = {"dapeng": ours, **refs}
        flops = {side: step_flops(model, loss_fn, autocast) for side, model in models.items()}
        timed = dict(models)
        if args.compile:  # compiled after counting FLOPs on the eager models; warm-up steps absorb the compile
            timed = {side: torch.compile(model) for side, model in timed.items()}
        secs = race({side: (model, loss_fn) for side, model in timed.items()}, steps, warmup, autocast, now)
        tokens = batch * seq
        for side, model in models.items():
            achieved = flops[side] / secs[side]
            results[f"{kind}_{side}"] = {
                "params": params(model),
                "step_s": round(secs[side], 4),
                "tokens_per_s": round(tokens / secs[side], 1),
                "gflop_per_step": round(flops[side] / 1e9, 3),
                "achieved_gflops": round(achieved / 1e9, 2),
                "fraction_of_peak": round(achieved / peaks[precision], 3),
                "fraction_of_fp32_peak": round(achieved / peaks["fp32"], 3),
                "fraction_of_bf16_peak": round(achieved / peaks["bf16"], 3),
            }
        for side in refs:
            ratios[f"{kind}_vs_{side}"] = round(secs[side] / secs["dapeng"], 3)
        # the figure, computed literally (achieved ÷ the bf16 peak), and the one against fp32
        results[f"{kind}_fraction_of_bf16_peak"] = results[f"{kind}_dapeng"]["fraction_of_bf16_peak"]
        results[f"{kind}_fraction_of_fp32_peak"] = results[f"{kind}_dapeng"]["fraction_of_fp32_peak"]
    results["batch"], results["seq"] = batch, seq
    env = {
        "threads": args.threads,
        "precision": precision,
        "native_bf16": native_bf16,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "quick": args.quick,
        "compile": args.compile,
        "steps": steps,
        "timer": "process CPU time" if args.threads == 1 else "wall time",
        "note": (
            "shared 2-core machine; sides alternate step by step, median step counts. "
            + ("" if native_bf16 else "This CPU has no native bf16 (AVX2 only): bf16 matmuls run reference kernels "
               "far slower than fp32, so training runs in fp32 and fraction_of_bf16_peak (achieved fp32 FLOP/s "
               "over the measured bf16 peak) exceeds 1 and says nothing about efficiency; "
               "fraction_of_fp32_peak is the meaningful one here.")
        ),
    }
    print(json.dumps({"results": results, "ratios": ratios, "env": env}), flush=True)
    return 0 if all(math.isfinite(v) for v in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
