"""Your own training loop with dapeng's pieces: precision, optimizer + schedule, exact-resume
checkpoints, tracking and callbacks — the same ones `Trainer.fit` uses.

    python examples/custom_loop.py --out runs/custom-loop            # train an MLP on digits
    python examples/custom_loop.py --out runs/custom-loop --resume   # continue after a kill

Writes RUN/metrics.jsonl, RUN/tb/ (TensorBoard), RUN/checkpoints/last.pt and RUN/model/
(an Artifact that `dapeng.load("runs/custom-loop/model")` reads).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dapeng.config import DataConfig
from dapeng.data import load_splits
from dapeng.hub.artifact import save_artifact
from dapeng.models import MODELS
from dapeng.tasks import TASKS
from dapeng.track import JsonlLogger, TensorBoardLogger, plot_curves, read_log
from dapeng.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dapeng.train.optim import build_optimizer, build_schedule
from dapeng.train.precision import autocast, eval_mode, resolve_device, resolve_precision, seed_everything
from dapeng.train.sampler import ResumableBatchSampler
from dapeng.train.trainer import batch_size_of


class PrintEveryEpoch:
    """A callback: any object with `on_<event>(trainer, **info)` methods. Here `trainer` is None."""

    def on_eval_end(self, trainer: object, metrics: dict[str, float]) -> None:
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))


def evaluate(model: torch.nn.Module, task, loader: DataLoader, precision: str, device: torch.device) -> dict[str, float]:
    metric, total, count = task.metric(), 0.0, 0
    with eval_mode(model), autocast(precision, device):
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, outputs = task.loss(model, batch)
            total += loss.item() * batch_size_of(batch)
            count += batch_size_of(batch)
            metric.update(outputs, batch)
    return {"eval/loss": total / count, **{f"eval/{k}": v for k, v in metric.compute().items()}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/custom-loop"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    # 1. data and task: the same records and encoding `dapeng train` uses
    seed_everything(0)
    splits = load_splits(DataConfig(dataset="digits"))
    task = TASKS.create("image-classification")
    task.setup(splits.train)
    train_items, eval_items = task.encode(splits.train), task.encode(splits.eval)

    # 2. model, device, precision (bf16 autocast where the hardware runs it natively)
    model_kwargs = {**task.model_kwargs(), "hidden": 64, "layers": 1}
    device = resolve_device("auto")
    precision = resolve_precision(args.precision, device)
    model = MODELS.create("mlp", **model_kwargs).to(device)

    # 3. a seeded, resumable data order; a private generator keeps the global RNG for dropout only
    sampler = ResumableBatchSampler(len(train_items), 32, seed=0)
    loader = DataLoader(train_items, batch_sampler=sampler, collate_fn=task.collate, generator=torch.Generator())
    eval_loader = DataLoader(eval_items, batch_size=256, collate_fn=task.collate)

    # 4. optimizer (fused AdamW, no decay on biases/norms) and a warm-up + cosine schedule
    total_steps = args.epochs * len(sampler)
    optimizer = build_optimizer(model, "adamw", lr=3e-3, weight_decay=0.01)
    schedule = build_schedule(optimizer, "cosine", total_steps=total_steps, warmup_steps=20)

    # 5. tracking and callbacks: called by hand, with the event names the Trainer uses
    callbacks = [JsonlLogger(args.out / "metrics.jsonl"), TensorBoardLogger(args.out / "tb"), PrintEveryEpoch()]
    ckpt = args.out / "checkpoints" / "last.pt"
    step, epoch = 0, 0
    if args.resume and ckpt.is_file():
        state = load_checkpoint(ckpt)  # weights_only=True: no pickled code runs
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, epoch = state["step"], state["epoch"]
        set_rng_state(state["rng"])
    for tracker in callbacks[:2]:
        tracker.start(step)  # a resumed run drops what was logged after its checkpoint

    model.train()
    metrics: dict[str, float] = {}
    while epoch < args.epochs:
        sampler.set_epoch(epoch)  # checkpoints are per epoch here; set_epoch(epoch, start=k) resumes mid-epoch
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(precision, device):
                loss, _ = task.loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:  # reading the loss syncs with the device: only when logging
                logs = {"step": step, "train/loss": loss.item(), "train/lr": schedule.get_last_lr()[0]}
                for cb in callbacks:
                    getattr(cb, "on_log", lambda t, logs: None)(None, logs=logs)
        epoch += 1
        metrics = evaluate(model, task, eval_loader, precision, device)
        for cb in callbacks:
            getattr(cb, "on_log", lambda t, logs: None)(None, logs={"step": step, **metrics})
            getattr(cb, "on_eval_end", lambda t, metrics: None)(None, metrics=metrics)
        # an atomic checkpoint at each epoch end: a kill at any moment leaves the last good one
        save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict(), "step": step, "epoch": epoch, "rng": rng_state()})
    for cb in callbacks:
        getattr(cb, "on_fit_end", lambda t, summary=None: None)(None)

    save_artifact(args.out / "model", model=model.cpu(), model_name="mlp", model_kwargs=model_kwargs,
                  task_name="image-classification", task_state=task.state(),
                  metrics={"eval": metrics}, card={"data": "scikit-learn digits (1,797 8×8 images)"})
    plot_curves(read_log(args.out / "metrics.jsonl"), args.out / "curves.png", title="custom loop")
    assert math.isfinite(metrics["eval/loss"])
    print(f"model written to {args.out / 'model'}")
    return metrics


if __name__ == "__main__":
    main()
