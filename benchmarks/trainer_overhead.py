"""What the Trainer costs: `Trainer.fit` against a plain hand-written loop and against
Hugging Face's `transformers.Trainer`.

    python benchmarks/trainer_overhead.py            # MLP on digits; BERT-base built from config
    python benchmarks/trainer_overhead.py --quick    # smaller and shorter (CI)

1. **Trainer vs hand loop** — dapeng's `mlp` on scikit-learn's digits (real data, the
   `image-classification` task), same initial weights, batches, fused AdamW, precision and
   thread count. The hand loop is what one would write: a shuffled DataLoader, autocast,
   `task.loss`, backward, step, `zero_grad(set_to_none=True)`. The Trainer runs with its
   defaults (schedule step each step, loss read every 50 steps), no evaluation, no checkpoints.
   Small steps (about a millisecond) make per-step overhead as visible as it can be.
2. **Trainer vs HF Trainer** — `BertForSequenceClassification` built from `BertConfig()`
   (BERT-base size, random weights: no download), random token ids of a fixed length,
   the same fused AdamW, constant learning rate, gradient clipping at 1.0 (HF's default),
   fp32/bf16 on both sides, no evaluation, no saving, logging every 50 steps.

Each side's wall time covers its whole `fit`/`train()` call (set-up included), sides
alternate within each repeat so that background load on a shared machine hits both, and
the median over repeats counts. The last line of stdout is one JSON object; ratios are
dapeng samples/s ÷ baseline samples/s (>1: dapeng is faster).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dapeng.config import DataConfig
from dapeng.data import load_splits
from dapeng.models import MODELS
from dapeng.tasks import TASKS
from dapeng.train.precision import autocast, resolve_precision
from dapeng.train.trainer import Trainer

# ----------------------------------------------------------------------------- 1. hand loop


def hand_loop(model: nn.Module, task: Any, items: list, *, epochs: int, batch_size: int, lr: float,
              precision: str, seed: int) -> None:
    """The plain PyTorch loop the Trainer is measured against."""
    device = torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    loader = DataLoader(items, batch_size=batch_size, shuffle=True, collate_fn=task.collate,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            with autocast(precision, device):
                loss, _ = task.loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def dapeng_fit(model: nn.Module, task: Any, items: list, *, epochs: int, batch_size: int, lr: float,
               precision: str, seed: int) -> None:
    Trainer(model, task, epochs=epochs, batch_size=batch_size, optimizer="adamw", lr=lr, weight_decay=0.0,
            precision=precision, device="cpu", seed=seed).fit(items)


def bench_hand_loop(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    splits = load_splits(DataConfig(dataset="digits"))
    task = TASKS.create("image-classification")
    task.setup(splits.train)
    items = task.encode(splits.train)
    torch.manual_seed(0)
    init = MODELS.create("mlp", **task.model_kwargs(), hidden=args.mlp_hidden, layers=args.mlp_layers)
    kwargs = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-3, "precision": precision, "seed": 0}
    sides = {"hand_loop": hand_loop, "trainer": dapeng_fit}
    for fn in sides.values():  # warm-up: first optimizer imports torch._dynamo, first kernels allocate
        fn(copy.deepcopy(init), task, items[: args.batch_size * 4], **{**kwargs, "epochs": 1})
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            model = copy.deepcopy(init)
            start = time.perf_counter()
            sides[name](model, task, items, **kwargs)
            times[name].append(time.perf_counter() - start)
    samples = len(items) * args.epochs
    result = {f"{name}_samples_per_sec": samples / statistics.median(t) for name, t in times.items()}
    result.update({f"{name}_seconds": [round(x, 4) for x in t] for name, t in times.items()})
    result["mlp_params"] = sum(p.numel() for p in init.parameters())
    result["steps_per_run"] = -(-len(items) // args.batch_size) * args.epochs
    return result


# ----------------------------------------------------------------------------- 2. HF Trainer


class BertTask:
    """The minimal Task that lets dapeng's Trainer train a Hugging Face sequence classifier."""

    name = "hf-bert"

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {"logits": out.logits}


def bench_hf(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    from transformers import Trainer as HFTrainer
    from transformers.trainer_callback import PrinterCallback

    transformers.logging.set_verbosity_error()
    if args.quick:
        config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                            num_labels=2)
    else:
        config = BertConfig(num_labels=2)  # BERT-base: 12 layers, 768 hidden, 110M parameters
    torch.manual_seed(0)
    init = BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    n = args.bert_steps * args.bert_batch
    ids = torch.randint(1000, config.vocab_size, (n, args.bert_seq), generator=gen)
    items = [{"input_ids": ids[i], "attention_mask": torch.ones(args.bert_seq, dtype=torch.long),
              "labels": torch.tensor(i % 2)} for i in range(n)]
    task = BertTask()
    out_dir = tempfile.mkdtemp(prefix="hf-trainer-")

    def hf(model: nn.Module, data: list) -> None:
        targs = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=args.bert_batch, num_train_epochs=1,
            learning_rate=1e-5, weight_decay=0.0, lr_scheduler_type="constant", optim="adamw_torch_fused",
            logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
            bf16=precision == "bf16", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = HFTrainer(model=model, args=targs, train_dataset=data, data_collator=task.collate)
        trainer.remove_callback(PrinterCallback)  # its end-of-training print is not part of the work
        trainer.train()

    def ours(model: nn.Module, data: list) -> None:
        # grad_clip=1.0: HF's default max_grad_norm, so both sides do the same work
        Trainer(model, task, epochs=1, batch_size=args.bert_batch, optimizer="adamw", lr=1e-5, grad_clip=1.0,
                precision=precision, device="cpu").fit(data)

    sides = {"dapeng_trainer": ours, "hf_trainer": hf}
    for fn in sides.values():
        fn(copy.deepcopy(init), items[: args.bert_batch * 2])
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            model = copy.deepcopy(init)
            start = time.perf_counter()
            sides[name](model, items)
            times[name].append(time.perf_counter() - start)
    result = {f"bert_{name}_samples_per_sec": n / statistics.median(t) for name, t in times.items()}
    result.update({f"bert_{name}_seconds": [round(x, 3) for x in t] for name, t in times.items()})
    result["bert_params"] = sum(p.numel() for p in init.parameters())
    result["bert_shape"] = {"steps": args.bert_steps, "batch": args.bert_batch, "seq": args.bert_seq,
                            "layers": config.num_hidden_layers, "hidden": config.hidden_size}
    return result


# ----------------------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small and short (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-hf", action="store_true", help="only the hand-loop comparison")
    args = parser.parse_args()
    q = args.quick
    args.repeats = args.repeats or (3 if q else 4)
    args.epochs = 2 if q else 6
    args.batch_size = 64
    args.mlp_hidden, args.mlp_layers = (128, 2) if q else (256, 2)
    args.bert_steps, args.bert_batch, args.bert_seq = (8, 8, 32) if q else (8, 8, 64)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("DAPENG_QUIET", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    precision = resolve_precision(args.precision, torch.device("cpu"))

    results = bench_hand_loop(args, precision)
    ratios = {"trainer_vs_hand_loop": results["trainer_samples_per_sec"] / results["hand_loop_samples_per_sec"]}
    print(f"Trainer {results['trainer_samples_per_sec']:.0f} samples/s vs hand loop "
          f"{results['hand_loop_samples_per_sec']:.0f}: ratio {ratios['trainer_vs_hand_loop']:.3f}", flush=True)
    if not args.skip_hf:
        results.update(bench_hf(args, precision))
        ratios["trainer_vs_hf_trainer"] = (results["bert_dapeng_trainer_samples_per_sec"]
                                           / results["bert_hf_trainer_samples_per_sec"])
        print(f"BERT: dapeng Trainer {results['bert_dapeng_trainer_samples_per_sec']:.2f} samples/s vs HF Trainer "
              f"{results['bert_hf_trainer_samples_per_sec']:.2f}: ratio {ratios['trainer_vs_hf_trainer']:.3f}",
              flush=True)
    env = {
        "threads": torch.get_num_threads(), "precision": precision, "torch": torch.__version__, "cpu": cpu_name(),
        "cores": os.cpu_count(), "quick": q, "repeats": args.repeats,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(json.dumps({"results": results, "ratios": ratios, "env": env}))


if __name__ == "__main__":
    main()
