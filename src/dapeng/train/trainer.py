"""The Trainer: a small, task-agnostic loop with named events and callbacks.

The Task owns the loss (`task.loss(model, batch) -> (loss, outputs)`) and the metrics;
the Trainer owns the order of things: batches, precision, accumulation, clipping, the
optimizer and schedule steps, evaluation, checkpoints and the events callbacks hear:

    on_fit_start → (on_epoch_start → (on_step_end | on_log | on_eval_end | on_checkpoint)* →
    on_epoch_end)* → on_fit_end

A callback is any object with some of those methods, each called as
`callback.on_<event>(trainer, **info)`. A callback ends training early by raising
`StopTraining` (the loop finishes cleanly: final checkpoint, `on_fit_end`).

The hot loop adds nothing per step that a hand-written loop would not do: the losses
stay on the device and is read (one sync) only every `log_every` steps, gradients
are freed with `set_to_none`, the optimizer is fused, and events without listeners cost
nothing. Every piece (`autocast`, `build_optimizer`, `save_checkpoint`, the trackers) can
be used from your own loop too: see `examples/custom_loop.py`.

On many processes (torchrun; `dapeng.train.distributed`) the same loop runs on every
rank: `batch_size` is the global batch, split evenly over the data-parallel ranks by the
sampler; the model is wrapped by `strategy` (DDP, FSDP2 or tensor parallel); logged
training losses are the mean over the ranks; every rank evaluates every item once (the
metrics are the same on all); only rank 0 writes checkpoints (FSDP/TP: each rank its
shards) — give file-writing callbacks to rank 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dapeng.errors import CheckpointError, ConfigError
from dapeng.train import distributed
from dapeng.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dapeng.train.ema import WeightAverage
from dapeng.train.optim import build_optimizer, build_schedule, decayed_parameters, l1_penalty
from dapeng.train.precision import (
    autocast,
    eval_mode,
    maybe_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_deterministic,
)
from dapeng.train.sampler import ResumableBatchSampler

EVENTS = (
    "on_fit_start",
    "on_epoch_start",
    "on_step_end",
    "on_log",
    "on_eval_end",
    "on_checkpoint",
    "on_epoch_end",
    "on_fit_end",
)
LAST = "last.pt"
BEST = "best.pt"


def checkpoint_exists(checkpoint_dir: str | Path) -> bool:
    """Whether `checkpoint_dir` holds a last checkpoint to resume from (`last.pt`, or FSDP/TP's sharded `last/`)."""
    folder = Path(checkpoint_dir)
    return (folder / LAST).is_file() or distributed.sharded_checkpoint(folder / Path(LAST).stem) is not None


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a callback (or `max_steps`) to end `fit` cleanly after the current step."""


@dataclasses.dataclass
class TrainState:
    """Where training stands; saved in every checkpoint.

    Attributes:
        step: optimizer steps done.
        epoch: the current epoch (0-based).
        batch: micro-batches done in the current epoch.
        samples: training samples seen.
        best: the best value of the monitored metric so far.
        best_step: the step at which `best` was reached.
        bad_evals: evaluations since the last improvement.
        last_eval: the metrics of the latest evaluation.
        last_log: the latest logged training values.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    last_log: dict[str, float] = dataclasses.field(default_factory=dict)


class EarlyStopping:
    """Stops training after `patience` evaluations without improvement of the monitored metric."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.state.bad_evals >= self.patience:
            raise StopTraining(f"no improvement of {trainer.monitor} in {self.patience} evaluations")


def monitor_mode(monitor: str, mode: str = "auto") -> str:
    """`min` for losses, errors and perplexities, `max` for everything else (accuracy, F1, BLEU)."""
    if mode != "auto":
        return mode
    name = monitor.lower()
    return "min" if any(word in name for word in ("loss", "error", "perplexity", "ppl", "mse", "mae")) else "max"


def batch_size_of(batch: Any) -> int:
    """The number of examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    return 1


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device` without blocking the host."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Trains `model` on a Task's encoded items. Arguments are plain values (see `dapeng.config.TrainConfig`).

    Args:
        model: the network; the Trainer moves it to `device`.
        task: the Task (`loss`, `collate`, `metric`).
        epochs: passes over the training items.
        max_steps: stop after this many optimizer steps (before `epochs` ends).
        batch_size: training micro-batch size (the effective batch is `batch_size * grad_accum`).
        eval_batch_size: evaluation batch size (default: `2 * batch_size`).
        optimizer: `sgd`, `adam` or `adamw`; `lr`, `weight_decay`, `momentum`, `nesterov`, `betas`, `eps` go to it.
        schedule: `constant`, `step`, `cosine` or `linear`, with `warmup_steps`, `step_size`, `gamma`, `min_lr_ratio`.
        l1: strength of the L1 penalty on weights (not biases or norms).
        grad_accum: micro-batches per optimizer step (an epoch's shorter last group is averaged over its own size).
        grad_clip: clip the gradients' global L2 norm to this value.
        ema: keep an exponential moving average of the weights with this decay (e.g. 0.999);
            evaluations, the best checkpoint and the weights left in the model after `fit` are
            the average's (`dapeng.train.ema.WeightAverage`).
        precision: `auto`, `fp32` or `bf16`.
        device: `auto`, `cpu` or `cuda`.
        compile: run the model through `torch.compile`.
        early_stopping: stop after this many evaluations without improvement.
        monitor: the metric that picks the best checkpoint (`eval/loss`, `eval/accuracy`, ...).
        mode: `min`, `max`, or `auto` (min for losses).
        seed: seeds Python, NumPy, torch and the data order.
        deterministic: deterministic kernels, for bit-identical reruns and resumes.
        checkpoint_dir: where `last.pt` and `best.pt` go (None: no checkpoints, best weights kept in memory).
        checkpoint_every: steps between checkpoints (default: each epoch end).
        eval_every: steps between evaluations (default: each epoch end).
        log_every: steps between training-loss logs (each log is one device sync).
        callbacks: objects with `on_<event>` methods.
        param_groups: explicit optimizer parameter groups (e.g. layer-wise learning rates from
            `dapeng.train.finetune.layerwise_lr_groups`); built before a resume restores their state.
        strategy: `auto`, `none`, `ddp`, `fsdp` or `tp` (`dapeng.train.distributed`); joins
            torchrun's process group when launched by it.
        dist_timeout: seconds any collective waits for the other ranks before failing.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        schedule: str = "constant",
        warmup_steps: int = 0,
        step_size: int = 1000,
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        l1: float = 0.0,
        grad_accum: int = 1,
        grad_clip: float | None = None,
        ema: float | None = None,
        precision: str = "auto",
        device: str = "auto",
        compile: bool = False,
        early_stopping: int | None = None,
        monitor: str = "eval/loss",
        mode: str = "auto",
        seed: int = 0,
        deterministic: bool = False,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        eval_every: int | None = None,
        log_every: int = 50,
        callbacks: Sequence[Any] = (),
        param_groups: Sequence[dict[str, Any]] | None = None,
        strategy: str = "auto",
        dist_timeout: float = 300.0,
    ) -> None:
        self.world = distributed.init(strategy, device, dist_timeout)
        self.strategy = distributed.resolve_strategy(strategy, self.world.size)
        if ema is not None and self.strategy in distributed.SHARDED:
            raise ConfigError(f"config key train.ema: not supported with train.strategy {self.strategy}",
                              "use ddp, or leave train.ema out")
        self.device = distributed.device_for(resolve_device(device))
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device)
        self.task = task
        self.param_groups = param_groups
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.optimizer_args = {
            "name": optimizer, "lr": lr, "weight_decay": weight_decay, "momentum": momentum,
            "nesterov": nesterov, "betas": tuple(betas), "eps": eps,
        }
        self.schedule_args = {
            "name": schedule, "warmup_steps": warmup_steps, "step_size": step_size,
            "gamma": gamma, "min_lr_ratio": min_lr_ratio,
        }
        self.l1 = l1
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        if ema is not None and not 0.0 < ema < 1.0:
            raise ConfigError(f"config key train.ema: {ema} is not a decay in (0, 1)", "use e.g. 0.999, or leave it out")
        self.ema = ema
        self.weight_average: WeightAverage | None = None
        self.compile = compile
        self.monitor = monitor
        self.mode = monitor_mode(monitor, mode)
        self.seed = seed
        self.deterministic = deterministic
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.eval_every = eval_every
        self.log_every = log_every
        self.callbacks: list[Any] = list(callbacks)
        if early_stopping:
            self.callbacks.append(EarlyStopping(early_stopping))
        self.state = TrainState()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.total_steps = 0
        self.steps_per_epoch = 0
        self.stop_reason: str | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._handlers: dict[str, list[Any]] = {}
        self._plain: nn.Module | None = None  # the unsharded architecture, for export_model under FSDP/TP
        self._replicas = 1
        self._wrapped: nn.Module | None = None  # the model under its strategy (DDP's wrapper, or sharded in place)
        self.train_model: nn.Module = self.model

    # ------------------------------------------------------------------ public API

    def add_callback(self, callback: Any) -> None:
        """Register an object whose `on_<event>` methods will be called."""
        self.callbacks.append(callback)

    def autocast(self) -> Any:
        """The precision context the Trainer runs forward passes in."""
        return autocast(self.precision, self.device)

    def fit(self, train: Sequence[Any], eval: Sequence[Any] | None = None, *, resume: bool = False) -> dict[str, Any]:
        """Train on `train` items (from `task.encode`), evaluating on `eval` items.

        Args:
            train: encoded training items.
            eval: encoded evaluation items (None: no evaluation; the last weights are the best).
            resume: continue from `checkpoint_dir/last.pt` exactly where it stopped.

        Returns:
            A summary: steps, epochs, samples, the last training loss, throughput, the
            best monitored value and the latest evaluation metrics.
        """
        if not len(train):
            raise ConfigError("no training items", "check data.train / data.limit")
        set_deterministic(self.deterministic)
        seed_everything(self.seed)
        replicas, rank = distributed.data_parallel_ranks(self.strategy)
        if self.batch_size % replicas:
            raise ConfigError(f"config key train.batch_size: {self.batch_size} does not split over {replicas} ranks",
                              f"use a multiple of {replicas} (it is the global batch)")
        self._replicas = replicas
        sampler = ResumableBatchSampler(len(train), self.batch_size, shuffle=True, seed=self.seed,
                                        num_replicas=replicas, rank=rank)
        loader = self._loader(train, sampler)
        wrapped = self._wrap()
        self.steps_per_epoch = math.ceil(len(sampler) / self.grad_accum)
        self.total_steps = self.epochs * self.steps_per_epoch
        if self.max_steps:
            self.total_steps = min(self.total_steps, self.max_steps)
        self.optimizer = build_optimizer(self.model, groups=self.param_groups, **self.optimizer_args)
        self.scheduler = build_schedule(self.optimizer, total_steps=self.total_steps, **self.schedule_args)
        # A constant rate without warm-up never changes: skip the per-step scheduler call.
        self._step_schedule = not (self.schedule_args["name"] == "constant" and not self.schedule_args["warmup_steps"])
        self.weight_average = WeightAverage(self.model, self.ema) if self.ema else None
        self.train_model = maybe_compile(wrapped, self.compile)
        self._l1_params = decayed_parameters(self.model) if self.l1 else []
        self._handlers = {event: [cb for cb in self.callbacks if hasattr(cb, event)] for event in EVENTS}
        rng = None
        if resume:
            rng = self._restore()
        # The RNG is restored last, after everything above that may draw from it.
        if rng is not None:
            set_rng_state(rng)
        self.model.train()
        self._emit("on_fit_start")
        started, start_samples = time.perf_counter(), self.state.samples
        try:
            while self.state.epoch < self.epochs and not self._done():
                sampler.set_epoch(self.state.epoch, start=self.state.batch)
                self._emit("on_epoch_start")
                self._run_epoch(loader, len(sampler), eval)
                self._end_epoch(eval)
        except StopTraining as stop:
            self.stop_reason = str(stop) or "stopped"
        if self.optimizer is not None and self.checkpoint_dir is not None:
            self.save_checkpoint()
        if self.weight_average is not None:
            self.weight_average.copy_to()  # as Keras does at the end of fit: the average is the result
        elapsed = time.perf_counter() - started
        summary = {
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "samples": self.state.samples,
            "loss": self.state.last_log.get("train/loss"),
            "samples_per_sec": (self.state.samples - start_samples) / elapsed if elapsed > 0 else None,
            "best": self.state.best,
            "best_step": self.state.best_step,
            "monitor": self.monitor,
            "stopped": self.stop_reason,
            "world_size": self.world.size,
            "strategy": self.strategy,
        }
        self._emit("on_fit_end", summary=summary)
        return summary

    @torch.no_grad()
    def evaluate(self, items: Sequence[Any], prefix: str = "eval", report_dir: str | Path | None = None) -> dict[str, float]:
        """Loss and task metrics over `items`, named `{prefix}/loss`, `{prefix}/<metric>`.

        With `report_dir`, a metric that can write a detailed report (`write_report(dir, prefix)`,
        e.g. a confusion matrix) writes it there with the file prefix `{prefix}_`.
        """
        if not len(items):
            return {}
        metric = self.task.metric()
        total = torch.zeros((), device=self.device)
        count = 0
        with eval_mode(self.model), self.autocast():
            for batch in self._eval_loader(items):
                batch = to_device(batch, self.device)
                loss, outputs = self.task.loss(self.model, batch)
                size = batch_size_of(batch)
                total += loss.detach().float() * size
                count += size
                metric.update(outputs, batch)
        results = {f"{prefix}/loss": total.item() / count}
        results.update({f"{prefix}/{name}": float(value) for name, value in metric.compute().items()})
        if report_dir is not None and hasattr(metric, "write_report") and self.world.is_main:
            metric.write_report(report_dir, prefix=f"{prefix}_")
        return results

    @torch.no_grad()
    def predict(self, items: Sequence[Any]) -> list[Any]:
        """Decoded predictions for `items` (`task.predict(model, batch)` if the task has it, else the
        outputs of `task.loss`), in the items' order."""
        predictions: list[Any] = []
        forward = getattr(self.task, "predict", None)
        with eval_mode(self.model), self.autocast():
            for batch in self._eval_loader(items):
                batch = to_device(batch, self.device)
                outputs = forward(self.model, batch) if forward else self.task.loss(self.model, batch)[1]
                predictions.extend(self.task.decode(outputs))
        return predictions

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the full training state (model, optimizer, schedule, RNGs, data position) atomically.

        Rank 0 writes it; under FSDP/TP every rank writes its shards into the folder `path`
        without `.pt` (`dapeng.train.distributed.save_sharded`), which loads on any world size.
        """
        path = Path(path) if path is not None else self._checkpoint_path(LAST)
        assert self.optimizer is not None and self.scheduler is not None, "save_checkpoint needs fit() to have started"
        state = {
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "trainer": dataclasses.asdict(self.state),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")},
        }
        if self.weight_average is not None:
            state["ema"] = self.weight_average.state_dict()
        if self.strategy in distributed.SHARDED:
            path = distributed.save_sharded(path.with_suffix(""), self.model, self.optimizer, state)
        else:
            if self.world.is_main:
                save_checkpoint(path, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                       **state})
            distributed.barrier()  # no rank runs ahead of (or resumes from) a half-written step
        self._emit("on_checkpoint", path=path)
        return path

    def export_model(self) -> nn.Module:
        """The trained model as a plain module with all its weights, on the CPU (for the Artifact).

        Under FSDP/TP the shards are gathered to rank 0: every rank must call it, and only rank
        0's module holds the weights (the others get the architecture on the meta device).
        """
        if self._plain is None:
            return self.model.to("cpu")
        weights = distributed.full_state_dict(self.model)
        if self.world.is_main:
            self._plain.load_state_dict(weights, assign=True)
        return self._plain

    def load_best(self) -> None:
        """Load the weights of the best evaluation into the model (no-op when there was none)."""
        best = self.checkpoint_dir / BEST if self.checkpoint_dir is not None else None
        if self._best_weights is not None:
            weights = self._best_weights
        elif best is not None and best.is_file():
            # sharded: rank 0 reads the full weights and broadcasts them shard by shard
            rank0_only = self._plain is not None and not self.world.is_main
            weights = {} if rank0_only else load_checkpoint(
                best, map_location="cpu" if self._plain is not None else self.device)["model"]
        else:
            return
        if self._plain is not None:
            distributed.load_full_state_dict(self.model, weights)
        else:
            self.model.load_state_dict(weights)

    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0

    # ------------------------------------------------------------------ the loop

    def _run_epoch(self, loader: DataLoader, n_batches: int, eval: Sequence[Any] | None) -> None:
        state, accum, device = self.state, self.grad_accum, self.device
        on_cpu = device.type == "cpu"
        has_step_end = bool(self._handlers["on_step_end"])
        losses: list[torch.Tensor] = []  # kept on the device; read (one sync) only when logging
        window_start, window_samples = time.perf_counter(), 0
        for batch in loader:
            if not on_cpu:
                batch = to_device(batch, device)
            with self._sync_gradients(state.batch + 1, n_batches):
                with self.autocast():
                    loss, _ = self.task.loss(self.train_model, batch)
                if self.l1:
                    loss = loss + l1_penalty(self._l1_params, self.l1)
                if accum > 1:
                    # the epoch's last group may hold fewer than `accum` micro-batches: average over those it has
                    group_start = state.batch - state.batch % accum
                    (loss / min(accum, n_batches - group_start)).backward()
                else:
                    loss.backward()
            losses.append(loss.detach())
            size = batch_size_of(batch) * self._replicas
            state.batch += 1
            state.samples += size
            window_samples += size
            if state.batch % accum and state.batch != n_batches:
                continue
            self._optimizer_step()
            state.step += 1
            if state.step % self.log_every == 0:
                now = time.perf_counter()
                self._log_train(self._mean_loss(losses), window_samples / max(now - window_start, 1e-9))
                losses.clear()
                window_start, window_samples = now, 0
            if has_step_end:
                self._emit("on_step_end")
            if self.eval_every and eval and state.step % self.eval_every == 0:
                self._evaluate_and_monitor(eval)
            if self.checkpoint_every and self.checkpoint_dir is not None and state.step % self.checkpoint_every == 0:
                self.save_checkpoint()
            if self._done():
                raise StopTraining(f"reached max_steps={self.max_steps}")
        if losses:
            now = time.perf_counter()
            self._log_train(self._mean_loss(losses), window_samples / max(now - window_start, 1e-9))

    def _sync_gradients(self, done: int, n_batches: int) -> Any:
        """DDP all-reduces gradients only on the micro-batch that ends an accumulation group."""
        if self.strategy != "ddp" or self.grad_accum == 1 or done % self.grad_accum == 0 or done == n_batches:
            return contextlib.nullcontext()
        return self._wrapped.no_sync()

    def _mean_loss(self, losses: list[torch.Tensor]) -> float:
        """The window's mean training loss over every rank (the one sync a log costs)."""
        return distributed.mean_over_ranks(torch.stack(losses).float().mean()).item()

    def _wrap(self) -> nn.Module:
        """The model wrapped for the strategy, once (a second `fit` trains the same wrapped model)."""
        if self._wrapped is not None:
            return self._wrapped
        if self.strategy in distributed.SHARDED:
            names = {id(p): name for name, p in self.model.named_parameters()}
            self._plain = distributed.plain_copy(self.model)
            self._wrapped = distributed.wrap(self.model, self.strategy, self.device)
            self.param_groups = distributed.remap_groups(self.param_groups, names, self.model)
        else:
            self._wrapped = distributed.wrap(self.model, self.strategy, self.device)
        return self._wrapped

    def _optimizer_step(self) -> None:
        if self.grad_clip is not None:
            if self.strategy == "tp":
                distributed.clip_grad_norm(list(self.model.parameters()), self.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        if self.weight_average is not None:
            self.weight_average.update()
        if self._step_schedule:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self, eval: Sequence[Any] | None) -> None:
        self.state.epoch += 1
        self.state.batch = 0
        if eval and not self.eval_every:
            self._evaluate_and_monitor(eval)
        self._emit("on_epoch_end")
        if self.checkpoint_dir is not None and not self.checkpoint_every:
            self.save_checkpoint()

    def _done(self) -> bool:
        return bool(self.max_steps) and self.state.step >= self.max_steps

    def _log_train(self, loss: float, throughput: float) -> None:
        logs = {
            "train/loss": loss,
            "train/lr": self.lr(),
            "train/samples_per_sec": throughput,
            "train/epoch": self.state.epoch + self.state.batch / max(1, self.steps_per_epoch * self.grad_accum),
        }
        self.state.last_log = logs
        self._emit("on_log", logs=logs)

    def _evaluate_and_monitor(self, eval: Sequence[Any]) -> dict[str, float]:
        if self.weight_average is None:
            return self._monitor(eval)
        with self.weight_average.applied():  # evaluate, and keep as the best, the averaged weights
            return self._monitor(eval)

    def _monitor(self, eval: Sequence[Any]) -> dict[str, float]:
        metrics = self.evaluate(eval)
        if self.monitor not in metrics:
            raise ConfigError(
                f"config key train.monitor: {self.monitor!r} is not a metric of this task",
                f"choose one of {', '.join(sorted(metrics))}",
            )
        value = metrics[self.monitor]
        best = self.state.best
        improved = best is None or (value < best if self.mode == "min" else value > best)
        if improved:
            self.state.best, self.state.best_step, self.state.bad_evals = value, self.state.step, 0
            self._save_best(metrics)
        else:
            self.state.bad_evals += 1
        self.state.last_eval = metrics
        self._emit("on_log", logs=metrics)
        self._emit("on_eval_end", metrics=metrics)
        return metrics

    def _save_best(self, metrics: dict[str, float]) -> None:
        if self._plain is not None:
            weights = distributed.full_state_dict(self.model)  # gathered to rank 0 ({} elsewhere)
        elif self.checkpoint_dir is None:
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            weights = self.model.state_dict()
        if self.checkpoint_dir is None:
            self._best_weights = weights
            return
        if self.world.is_main:
            save_checkpoint(self._checkpoint_path(BEST), {"model": weights, "step": self.state.step, "metrics": metrics})
        distributed.barrier()

    def _restore(self) -> dict[str, Any] | None:
        path = self._checkpoint_path(LAST)
        if self.strategy in distributed.SHARDED:
            ckpt = distributed.load_sharded(path.with_suffix(""), self.model, self.optimizer)
        else:
            if not path.is_file():
                raise CheckpointError(f"nothing to resume: {str(path)!r} not found", "run without --resume to start")
            ckpt = load_checkpoint(path, map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(**ckpt["trainer"])
        if self.weight_average is not None:
            if "ema" not in ckpt:
                raise CheckpointError(
                    f"{str(path)!r} holds no weight average, but train.ema is set",
                    "resume with the train.ema the run started with",
                )
            self.weight_average.load_state_dict(ckpt["ema"])
        saved = ckpt.get("callbacks", {})
        for cb in self.callbacks:
            if hasattr(cb, "load_state_dict") and type(cb).__name__ in saved:
                cb.load_state_dict(saved[type(cb).__name__])
        return ckpt["rng"]

    # ------------------------------------------------------------------ helpers

    def _checkpoint_path(self, name: str) -> Path:
        if self.checkpoint_dir is None:
            raise CheckpointError("this Trainer has no checkpoint_dir", "pass checkpoint_dir= to save or resume")
        return self.checkpoint_dir / name

    def _loader(self, items: Sequence[Any], sampler: ResumableBatchSampler) -> DataLoader:
        # A private generator: creating an iterator must not draw from the global RNG,
        # or a resumed run's dropout masks would differ from the straight run's.
        return DataLoader(
            items,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=self.task.collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
        )

    def _eval_loader(self, items: Sequence[Any]) -> DataLoader:
        return DataLoader(
            items,  # type: ignore[arg-type]
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.task.collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
        )

    def _emit(self, event: str, **info: Any) -> None:
        for callback in self._handlers.get(event, ()):
            getattr(callback, event)(self, **info)
