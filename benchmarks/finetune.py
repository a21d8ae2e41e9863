"""Fine-tuning MiniLM-L6 on Rotten Tomatoes: full fine-tuning and LoRA, beside a from-scratch TextCNN.

All three go through the same pieces as `dapeng train`: the `text-classification` task,
the canonical seeded split of the `rotten-tomatoes` catalog entry, the Trainer. Full
fine-tuning runs `dapeng.runner.train` with `model.init: minilm-l6`; LoRA the same with
`model.lora` (every linear layer of the encoder, rank 8: under 2% of the parameters
train), which the runner merges back into the weights (`merge_lora`) before saving.
The baseline (TextCNN from scratch, same data, same epochs) runs in the same process.

    python benchmarks/finetune.py            # 3 epochs each, max length 64, bf16 where native (hours on 2 busy cores)
    python benchmarks/finetune.py --quick    # 300 training reviews, 1 epoch: a smoke run

The last line of stdout is one JSON object: results.{full,lora,scratch}.test_accuracy, ratios, env.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dapeng.config import RunConfig
from dapeng.runner import train
from dapeng.train.precision import resolve_device, resolve_precision


def config(args: argparse.Namespace, *, model: str, init: str | None, lr: float, lora: bool = False) -> RunConfig:
    lora_cfg = {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "targets": ["all-linear"]} if lora else None
    return RunConfig.model_validate({
        "task": "text-classification",
        "task_options": {"max_length": args.max_length},
        "data": {"dataset": "rotten-tomatoes", "limit": args.limit},
        "model": {"name": model, "init": init, "kwargs": {}, "lora": lora_cfg},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.01},
            "schedule": {"name": "linear", "warmup_steps": args.warmup},
            "precision": args.precision,
            "monitor": "eval/accuracy",
            "mode": "max",
            "seed": args.seed,
            "log_every": 50,
        },
    })


def log(msg: str) -> None:
    print(f"[finetune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_full(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cfg = config(args, model="transformer", init="minilm-l6", lr=args.lr)
    started = time.perf_counter()
    out = train(cfg, root / "full", progress=False)
    m = out["metrics"]
    return {
        "test_accuracy": m["test"]["accuracy"],
        "eval_accuracy": m["eval"]["accuracy"],
        "test_macro_f1": m["test"].get("macro_f1"),
        "trainable_fraction": 1.0,
        "train_samples_per_sec": m["train"].get("samples_per_sec"),
        "seconds": time.perf_counter() - started,
        "lr": args.lr,
    }


def run_lora(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cfg = config(args, model="transformer", init="minilm-l6", lr=args.lora_lr, lora=True)
    started = time.perf_counter()
    out = train(cfg, root / "lora", progress=False)  # applies LoRA, trains, evaluates, saves merged
    m = out["metrics"]
    return {
        "test_accuracy": m["test"]["accuracy"],
        "eval_accuracy": m["eval"]["accuracy"],
        "test_macro_f1": m["test"].get("macro_f1"),
        "trainable_fraction": m["train"]["trainable_fraction"],
        "rank": args.lora_rank,
        "train_samples_per_sec": m["train"].get("samples_per_sec"),
        "seconds": time.perf_counter() - started,
        "lr": args.lora_lr,
    }


def run_scratch(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cfg = config(args, model="textcnn", init=None, lr=1e-3)
    started = time.perf_counter()
    out = train(cfg, root / "scratch", progress=False)
    m = out["metrics"]
    return {"test_accuracy": m["test"]["accuracy"], "eval_accuracy": m["eval"]["accuracy"],
            "train_samples_per_sec": m["train"].get("samples_per_sec"), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 training reviews, 1 epoch")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training reviews")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=8e-5)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--precision", default="auto", choices=["bf16", "fp32", "auto"],
                        help="auto: bf16 where the CPU/GPU runs it natively (AVX-512 BF16, AMX, CUDA), else fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["full", "lora", "scratch"], action="append", help="run only these")
    args = parser.parse_args()
    if args.quick:
        args.limit = 300
    if args.quick:
        args.epochs, args.warmup = 1, 5
    torch.set_num_threads(args.threads)
    runs = args.only or ["full", "lora", "scratch"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dapeng-finetune-") as tmp:
        for name in runs:
            log(f"{name}: start")
            results[name] = {"full": lambda: run_full(args, Path(tmp)), "lora": lambda: run_lora(args, Path(tmp)),
                             "scratch": lambda: run_scratch(args, Path(tmp))}[name]()
            log(f"{name}: {json.dumps(results[name])}")
    ratios = {}
    if "scratch" in results:
        for name in ("full", "lora"):
            if name in results:
                ratios[f"{name}_vs_scratch_test_accuracy"] = results[name]["test_accuracy"] / results["scratch"]["test_accuracy"]
    env = {
        "threads": torch.get_num_threads(),
        "precision": resolve_precision(args.precision, resolve_device("auto")),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "epochs": args.epochs,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "quick": args.quick,
        "train_limit": args.limit,
        "note": "shared 2-core machine: throughput figures are noisy, accuracies are not",
    }
    print(json.dumps({"results": results, "ratios": ratios, "env": env}))


if __name__ == "__main__":
    main()
